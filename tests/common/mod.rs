//! Shared by the integration tests.

/// Runs each named scenario `fn name(m: StartMethod)` as three tests, one per start method.
#[macro_export]
macro_rules! each_method {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use multiprocess::StartMethod;
                #[test]
                fn fork() {
                    super::$name(StartMethod::Fork)
                }
                #[test]
                fn spawn() {
                    super::$name(StartMethod::Spawn)
                }
                #[test]
                fn forkserver() {
                    super::$name(StartMethod::Forkserver)
                }
            }
        )*
    };
}
