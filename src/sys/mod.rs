//! The operating-system layer: the one place with free `unsafe` (allowed here, denied
//! crate-wide by `[lints]`), every block with a `// SAFETY:` argument. Everything above it
//! uses the safe wrappers here, and nothing here names a module above it.
#![allow(unsafe_code)]

pub(crate) mod fd;
pub(crate) mod futex;
pub(crate) mod ident;
pub(crate) mod image;
pub(crate) mod page;
pub(crate) mod per_process;
pub(crate) mod process;
pub(crate) mod reactor;
pub(crate) mod region;
pub(crate) mod robust;
pub(crate) mod shm;
pub(crate) mod shm_named;
pub(crate) mod socket;
pub(crate) mod status;
