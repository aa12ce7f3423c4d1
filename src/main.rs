//! Thin entry point: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    chat_janitor::cli::run(chat_janitor::cli::Cli::parse())
}
