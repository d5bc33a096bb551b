//! The `hotplex` binary: tune the allocator, parse the command line, hand over to the
//! library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_malloc();
    let cli = hotplex::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(hotplex::commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The commands wait (bounded) for their own tasks; whatever is left must not hold the
    // exit (dropping a runtime waits for its blocking threads without a limit).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

/// Serves allocations of 8 KiB and more from their own mappings (glibc's default threshold
/// starts at 128 KiB). Every HTTP connection holds such buffers (hyper's 8 KiB write and
/// 8–16 KiB read buffers) of which it touches only the first page; from fresh mappings the
/// untouched pages never become resident, while heap memory recycled from short-lived
/// allocations is already dirty. Measured: an idle SSE subscriber costs 16 KiB instead of
/// 24 KiB of RSS (docs/benchmarks.md, `subscribers`), with no throughput change the suite
/// can see. `MALLOC_MMAP_THRESHOLD_` in the environment still decides when set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets an allocator parameter; it is called before any other
    // thread exists, and its failure (return 0) leaves glibc's default in place.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8192);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
