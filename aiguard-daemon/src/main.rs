fn main() -> std::process::ExitCode {
    aiguard_daemon::cli::main()
}
