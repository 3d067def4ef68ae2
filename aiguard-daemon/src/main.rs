// A gateway request makes a few dozen short-lived allocations (headers, JSON, records);
// mimalloc's thread-local free lists serve them at a fraction of glibc malloc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    aiguard_daemon::cli::main()
}
