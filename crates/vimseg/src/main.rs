use clap::Parser;

fn main() -> std::process::ExitCode {
    cpu_ops::keep_freed_memory();
    vimseg::threads_from_scheduler();
    vimseg::exit(vimseg::run(&vimseg::Cli::parse().command))
}
