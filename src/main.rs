//! Thin entry point: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not glibc's allocator: `perf` had about 13% of the HTTP
/// workers' time in glibc's malloc and free (memory is freed on other
/// threads than the one that allocated it all along the pipeline: an
/// append's body is allocated by an HTTP worker and freed by the journal
/// writer), and `--only ab` of the same build on each allocator gave 1.040
/// (10 pairs, 0.93 of the CPU per 202; see the README). Its settings (two arenas, freed
/// pages returned at once) are compiled in from `.cargo/config.toml`, so a
/// bound on pending work stays a bound on RSS; `_RJEM_MALLOC_CONF` overrides
/// them at run time.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    chat_janitor::cli::run(chat_janitor::cli::Cli::parse())
}
