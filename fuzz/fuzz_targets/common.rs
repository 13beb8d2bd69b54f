//! A per-process scratch folder: the loaders under test read files, as they do for users.
use std::path::PathBuf;
use std::sync::OnceLock;

fn root() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lcm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Write `data` as `name` in the scratch folder.
#[allow(dead_code)]
pub fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let path = root().join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// A sub-folder of the scratch folder, created on first use.
#[allow(dead_code)]
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = root().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
