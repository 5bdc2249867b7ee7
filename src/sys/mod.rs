//! L0: the operating-system layer. This is the only module with free `unsafe`; every block
//! carries a `// SAFETY:` argument. Everything above it uses the safe wrappers here.

pub(crate) mod fd;
pub(crate) mod image;
pub(crate) mod init;
pub(crate) mod page;
pub(crate) mod per_process;
pub(crate) mod process;
pub(crate) mod socket;
