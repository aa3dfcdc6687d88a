//! `dbh completions SHELL` and `dbh man`: both generated from the clap definition in `cli`, so
//! they can never disagree with the parser (the ebuild installs both).

use std::path::Path;

use clap::CommandFactory;

use crate::Error;
use crate::cli::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Error> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "dbh", &mut buf);
    super::out(&String::from_utf8_lossy(&buf))
}

pub fn man(dir: Option<&Path>) -> Result<(), Error> {
    let cmd = Cli::command();
    match dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf).map_err(Error::Stdout)?;
            super::out(&String::from_utf8_lossy(&buf))
        }
        Some(dir) => {
            fs_err::create_dir_all(dir).map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| Error::Failed(format!("cannot write man pages into {}: {e}", dir.display())))
        }
    }
}
