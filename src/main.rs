//! The `dr` command-line entry point.

mod cli;

/// jemalloc rather than glibc's malloc: glibc gives threads that allocate at
/// once arenas of their own and seldom returns their free pages, so a busy
/// daemon held 450 MiB after 4 minutes; with jemalloc the same schedule
/// peaked at 130 MiB and settled near 55 (BENCHMARKS.md, daemon memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::run()
}
