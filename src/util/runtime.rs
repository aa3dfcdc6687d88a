//! Running async work from dbh's synchronous commands.
//!
//! One runtime shape for every command that talks to guests: a current-thread runtime on the
//! calling thread. QEMU is spawned from that thread, so the PR_SET_PDEATHSIG that ties it to dbh
//! (`process::die_with_parent`) is armed for the thread that lives as long as dbh; a worker thread
//! of a multi-thread runtime could end earlier and take the guest with it. `dbh serve` builds its
//! own multi-thread runtime: it spawns no children.

use std::future::Future;

/// Runs `fut` to completion on a new current-thread runtime on this thread.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output, std::io::Error> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(fut))
}

#[cfg(test)]
mod tests {
    #[test]
    fn block_on_returns_the_futures_output() {
        let out = super::block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            41 + 1
        })
        .unwrap();
        assert_eq!(out, 42);
    }
}
