//! The `walhook` binary: parse the command line, hand over to the library.

/// mimalloc rather than glibc's malloc: sled 0.34 copies a leaf node on every write and frees
/// the replaced one later, and glibc spent about a fifth of the stream thread's time on that
/// churn (consolidating and unlinking free chunks) in the classified benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    walhook::cli::main()
}
