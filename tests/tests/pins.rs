//! Pinned maps that do not fit: left by an aiguard with another map layout (an upgrade), or a
//! ban table of another capacity (`xdp.max_bans` changed). The dataplane must replace them
//! rather than load a program against maps of the wrong shape.
use std::{ffi::CString, path::PathBuf};

use aiguard_common::{XdpConfig, map_name};
use aiguard_daemon::dataplane::Dataplane;
use aiguard_tests::{privileged, unique_name};
use aya::maps::MapInfo;

/// A test's bpffs directory, removed with its pins on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Creates an array map with the given value size and pins it at `path`, as an older build
/// would have (raw syscalls: aya has no API for a map without a program object).
fn pin_array(path: &std::path::Path, value_size: u32) {
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let create = Create {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: a BPF_MAP_CREATE attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &create as *const Create,
            std::mem::size_of::<Create>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    let pin = Pin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: a BPF_OBJ_PIN attribute pointing at a live C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin as *const Pin,
            std::mem::size_of::<Pin>(),
        )
    };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: closing the fd we created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn pinned_map_of_an_older_layout_is_replaced() {
    if !privileged() {
        return;
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("agp")));
    std::fs::create_dir_all(&dir.0).expect("creating the pin directory");
    let config_pin = dir.0.join(map_name::CONFIG);
    pin_array(&config_pin, 48);

    let dp = Dataplane::load(&dir.0, 1024).expect("loading over an old CONFIG pin");
    let info = MapInfo::from_pin(&config_pin).expect("the CONFIG pin");
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<XdpConfig>(),
        "the old 48-byte CONFIG map was replaced by one of this version's layout"
    );
    drop(dp);
}

#[test]
fn ban_table_follows_a_changed_capacity() {
    if !privileged() {
        return;
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("agp")));
    let capacity = |dir: &PinDir| {
        MapInfo::from_pin(dir.0.join(map_name::BANS_V4))
            .expect("the BANS_V4 pin")
            .max_entries()
    };
    drop(Dataplane::load(&dir.0, 1024).expect("first load"));
    assert_eq!(capacity(&dir), 1024);
    drop(Dataplane::load(&dir.0, 1024).expect("same capacity: adopted"));
    assert_eq!(capacity(&dir), 1024);
    drop(Dataplane::load(&dir.0, 4096).expect("larger capacity"));
    assert_eq!(
        capacity(&dir),
        4096,
        "max_bans changed: the ban table was recreated"
    );
}

#[test]
fn second_daemon_on_the_same_pins_is_refused() {
    if !privileged() {
        return;
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("agp")));
    let first = Dataplane::load(&dir.0, 1024).expect("first load");
    let err = Dataplane::load(&dir.0, 1024)
        .err()
        .expect("the pin directory is taken");
    assert!(
        err.to_string()
            .contains("another aiguard daemon uses the pin directory"),
        "{err}"
    );
    drop(first);
    drop(Dataplane::load(&dir.0, 1024).expect("free again once the first one is gone"));
}

#[test]
fn restore_with_a_smaller_ban_table_says_so() {
    use aiguard_daemon::{
        bans::{BanError, BanList, BanSpec, Origin},
        store::Store,
    };
    if !privileged() {
        return;
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("agp")));
    let state = tempfile::tempdir().expect("a state directory");
    {
        let mut dp = Dataplane::load(&dir.0, 1024).expect("load");
        let store = Store::open(state.path()).expect("store");
        let (mut bans, _) = BanList::restore(store, &mut dp, 1024).expect("restore");
        let spec = BanSpec {
            ttl: None,
            reason: None,
            shadow: false,
            force: false,
            origin: Origin::Cli,
            node: None,
        };
        let ranges: Vec<String> = (1..=3).map(|i| format!("198.51.100.{i}")).collect();
        bans.ban(&mut dp, &ranges, &spec).expect("three bans");
    }
    let mut dp = Dataplane::load(&dir.0, 2).expect("load with room for two");
    let store = Store::open(state.path()).expect("store");
    match BanList::restore(store, &mut dp, 2) {
        Err(BanError::Full { family, max }) => assert_eq!((family, max), ("IPv4", 2)),
        Err(e) => panic!("expected a full table, got {e}"),
        Ok(_) => panic!("three bans do not fit in two"),
    }
}
