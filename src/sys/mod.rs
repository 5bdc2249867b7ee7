//! L0: the operating-system layer. This is the only module with free `unsafe`; every block
//! carries a `// SAFETY:` argument. Everything above it uses the safe wrappers here.

pub(crate) mod fd;
pub(crate) mod ident;
pub(crate) mod region;
pub(crate) mod shm_named;
// Used by the shared-state and queue modules as they land.
#[allow(dead_code)]
pub(crate) mod futex;
pub(crate) mod image;
pub(crate) mod page;
pub(crate) mod per_process;
pub(crate) mod process;
pub(crate) mod reactor;
pub(crate) mod robust;
#[allow(dead_code)]
pub(crate) mod shm;
pub(crate) mod socket;
pub(crate) mod status;
