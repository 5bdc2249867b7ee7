//! Life before `main`: a constructor in `.init_array` that lets a process started by this
//! crate (a spawned child, the forkserver) take its role before the user's `main` runs.

/// The constructor. glibc calls `.init_array` entries with `(argc, argv, envp)`.
extern "C" fn on_load(
    _argc: libc::c_int,
    _argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    // Settle the build identity now, while the process has one thread: computed lazily
    // it could be caught half-done by a fork, and the child would wait on it for ever.
    let _ = super::image::build_id();
    // A panic must not unwind out of an `extern "C"` function called by the loader.
    if std::panic::catch_unwind(crate::spawn::enter_role_if_child).is_err() {
        crate::sys::process::exit_now(70);
    }
}

// SAFETY (of the attribute): `.init_array` holds pointers to functions of exactly this
// signature; the loader calls each once, single-threaded, before `main`. `#[used]` keeps
// the entry even though nothing refers to it.
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char) =
    on_load;
