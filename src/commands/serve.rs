//! `dbh serve`: resolves the settings into a [`serve::Config`], binds, says where it listens,
//! and serves until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use super::Context;
use crate::cli::ServeArgs;
use crate::serve::{self, Config, Limits, ServeError, Server};
use crate::Error;

pub fn run(ctx: &Context, _args: ServeArgs) -> Result<(), Error> {
    // --dir/--listen/--public-url already went into the settings (commands::run), so files and
    // DBH_* variables provide the same knobs.
    let s = &ctx.settings;
    let dir = PathBuf::from(s.str("serve.dir").expect("serve.dir has a default"));
    let mut limits = Limits::default();
    if let Some(secs) = s.int("serve.header_timeout").filter(|v| *v > 0) {
        limits.header_timeout = Duration::from_secs(secs as u64);
    }
    if let Some(n) = s.int("serve.max_connections").filter(|v| *v > 0) {
        limits.max_connections = n as usize;
    }
    if let Some(n) = s.int("serve.max_per_ip").filter(|v| *v > 0) {
        limits.max_per_ip = n as usize;
    }
    let config = Config {
        dir,
        listen: s.list("serve.listen"),
        public_url: s.str("serve.public_url").map(str::to_owned),
        priority: s.int("binhost.priority").unwrap_or(10),
        key_file: s.home().keys().join("public.asc"),
        target_config: Some(s.home().root().join("targets")),
        distfiles: None,
        limits,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dbh-serve")
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(async {
        let server = Server::bind(config).await?;
        let shutdown = serve::shutdown_signal()?;
        for addr in server.local_addrs() {
            // Through the access log's target: a timestamped line like every request's (OpenRC's
            // log file adds none), shown unless -q.
            tracing::info!(target: "dbh::access", "serving {} on http://{addr}/", server.root().display());
        }
        server.run(shutdown).await
    })?;
    Ok(())
}
