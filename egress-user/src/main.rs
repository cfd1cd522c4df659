//! `egress`: the agent and its CLI, all in the library.

fn main() -> std::process::ExitCode {
    egress_user::cli::main()
}
