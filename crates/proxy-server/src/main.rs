//! `cc-proxy`: the daemon binary.

use std::process::ExitCode;

use proxy_server::config::Config;

fn main() -> ExitCode {
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
