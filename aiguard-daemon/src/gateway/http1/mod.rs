//! The gateway's HTTP/1.1: a client connection's requests read, answered and relayed to the
//! upstream in that connection's own task.
//!
//! Why not hyper: measured on the gateway's benchmark, hyper's server with hyper-util's
//! pooled client cost about 21 us of CPU per proxied request before the gateway did any work
//! of its own (nginx does the whole job in about 17 us), most of it in handing each request
//! and its response between the connection's task, the pool and the upstream connection's
//! task, in building header maps, and in reads that only find `EAGAIN`. Here the upstream
//! connection is checked out and driven by the task that serves the client, heads stay the
//! bytes they arrived as, and a request costs four socket calls: read it, write it upstream,
//! read the answer, write it back.
//!
//! # Layout
//! - [`io`]: socket reads and writes, and the one lazily moved timer a connection needs;
//! - [`head`]: request and response heads (parsing, the anti-smuggling rules, writing);
//! - [`body`]: the chunked transfer coding, both ways;
//! - [`upstream`]: pooled keep-alive connections to the upstream, and its responses;
//! - [`server`]: one client connection, from its first byte to its close.
pub mod body;
pub mod head;
pub mod io;
pub mod server;
pub mod upstream;
