//! The leaf utilities every other module shares: durable file writes and locks ([`fs`]), PATH
//! lookup ([`path`]), the clock in Unix seconds and the log-directory stamp ([`time`]), a free
//! loopback port ([`net`]), the runtime that drives async work from a command ([`runtime`]).
//!
//! A leaf: nothing here imports anything else from the crate, so any module may use it without an
//! import circle, and each helper exists once — before, atomic writes came in three durabilities
//! and PATH lookups in four sets of rules. Errors are plain `std::io::Error`s that name their
//! path (fs-err's, or built the same way); a caller wraps one in its own error where it adds
//! which file it was and a hint.

pub mod fs;
pub mod net;
pub mod path;
pub mod runtime;
pub mod time;
