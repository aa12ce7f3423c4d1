//! Thin entry point: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = chat_janitor::cli::Cli::parse();
    // A one-shot command (`send`, `status`, ...) exits before its memory
    // matters: no second exec for it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if cli.runs_until_stopped() {
        malloc_tuning::apply();
    }
    chat_janitor::cli::run(cli)
}

/// glibc's allocator, tuned for a long-running service whose memory is
/// bounded by design: the bound means little if the allocator keeps what
/// was freed. On its defaults, glibc gives each busy thread an arena of its
/// own (up to eight a core) and does not reuse one arena's free memory in
/// another, and it raises its mmap threshold after each large free, so the
/// growing buffers of a backlog (queues, maps) end up in the heap, where
/// freeing them returns nothing. With a backlog at the pending bound that
/// was some 15 MiB of RSS (section 7d of the benchmark, `--quick` runs). The tuning: two
/// arenas (one a core), a fixed mmap threshold of 64 KiB (large buffers are
/// mapped, and unmapped when freed), and trimming the heap's top above
/// 1 MiB.
///
/// glibc reads it from the environment once, before `main`, and the crate
/// forbids the unsafe `mallopt`; so a process that runs until stopped sets
/// `GLIBC_TUNABLES` and replaces itself (`exec`, same pid, same arguments)
/// once its arguments parse, before it does anything else. A `GLIBC_TUNABLES` already set, even empty, is left as it
/// is and nothing is re-executed: that is also how to opt out.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod malloc_tuning {
    use std::os::unix::process::CommandExt;

    const TUNABLES: &str = "glibc.malloc.arena_max=2:\
                            glibc.malloc.mmap_threshold=65536:\
                            glibc.malloc.trim_threshold=1048576";

    pub fn apply() {
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next();
        let mut cmd = std::process::Command::new(exe);
        if let Some(a) = argv0 {
            cmd.arg0(a);
        }
        // Only returns if the exec failed (the binary replaced on disk, say):
        // then this process goes on, on glibc's defaults.
        let _ = cmd.args(args).env("GLIBC_TUNABLES", TUNABLES).exec();
    }
}
