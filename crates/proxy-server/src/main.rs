//! `cc-proxy`: the daemon binary.

use std::process::ExitCode;

use proxy_server::config::Config;

/// Large buffers (a client frame of up to `--max-frame-size`, big io
/// reads) are allocated and freed as peers come and go. glibc raises its
/// mmap threshold each time such a buffer is freed, after which they come
/// from the heap, where freed ones stay resident: 64 clients each sending a
/// 4 MiB frame took 110 MiB under a 32 MiB budget. A fixed threshold keeps
/// every buffer above 1 MiB in its own mapping, returned when freed
/// (smaller ones, such as the 256 KiB read buffers of streaming clients,
/// stay on the heap and cost no system call).
///
/// A fixed mmap threshold also fixes the trim threshold, at 128 KiB
/// unless set: the heap gave back its top whenever that much of it was
/// free, and streaming output, whose io chunks (64 KiB each, up to a
/// session's 4 MiB queue of them in flight) are freed as they are
/// written, had the next chunks fault their pages in again. Measured with
/// `proxy-bench --only stdout --sizes 4096`: 9–28 thousand page faults and
/// 0.45–0.61 s of daemon CPU per GiB, against 1.5–2.8 thousand and
/// 0.32–0.39 s with the heap keeping up to 4 MiB free ([`TRIM_THRESHOLD`]).
#[cfg(target_env = "gnu")]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Free heap memory (at its top) that glibc keeps for reuse rather than
/// giving back: the working set of one session's default output queue.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: libc::c_int = 4 * 1024 * 1024;

#[cfg(not(target_env = "gnu"))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let config = match Config::parse_args(std::env::args()) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version land here too, with exit code 0.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = proxy_server::logging::init(&config.log, config.log_format) {
        eprintln!("cc-proxy: {e}");
        return ExitCode::from(2);
    }
    let mut builder = if config.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(config.threads));
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(proxy_server::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
