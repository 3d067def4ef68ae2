//! The CLI's side of the admin socket.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Reply, Request};

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket path.
    #[error(
        "cannot reach the aiguard daemon at {path}: {source}. Is it running? Start it with `aiguard run --interface IF` (or `systemctl start aiguard`), or point to its socket with --socket / AIGUARD_SOCKET"
    )]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The socket is root-only.
    #[error("permission denied on {path}: the admin socket is root-only; run this command as root")]
    PermissionDenied { path: PathBuf },
    /// The connection broke or the daemon answered something unreadable.
    #[error("talking to the daemon at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Sends one request and waits for its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: socket.to_owned(),
            }
        } else {
            ClientError::Unreachable {
                path: socket.to_owned(),
                source,
            }
        }
    })?;
    let protocol = |message: String| ClientError::Protocol {
        path: socket.to_owned(),
        message,
    };
    // Generous: a ban file of a million ranges takes seconds to apply.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let mut line = serde_json::to_vec(request).expect("requests always serialise");
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| protocol(format!("sending the request: {e}")))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| protocol(format!("reading the reply: {e}")))?;
    if reply.is_empty() {
        return Err(protocol(
            "the daemon closed the connection without a reply".into(),
        ));
    }
    serde_json::from_str(&reply).map_err(|e| protocol(format!("unreadable reply: {e}")))
}
