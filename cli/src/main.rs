use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = vpod_cli::Cli::parse();
    match vpod_cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
