//! `dbh serve`: resolves the settings into a [`serve::Config`], binds, says where it listens,
//! and serves until SIGINT/SIGTERM.

use super::Context;
use crate::serve::{self, Config, Limits, ServeError, Server};
use crate::Error;

pub fn run(ctx: &Context) -> Result<(), Error> {
    // --dir/--listen/--public-url went into the settings (commands::cli_values), so files and
    // DBH_* variables provide the same knobs.
    let s = &ctx.settings.serve;
    let config = Config {
        dir: s.dir.clone(),
        listen: s.listen.clone(),
        public_url: s.public_url.clone(),
        priority: ctx.settings.binhost.priority,
        key_file: ctx.settings.home().keys().join("public.asc"),
        target_config: Some(ctx.settings.home().root().join("targets")),
        distfiles: None,
        limits: Limits {
            header_timeout: s.header_timeout,
            max_connections: s.max_connections,
            max_per_ip: s.max_per_ip,
            ..Limits::default()
        },
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
