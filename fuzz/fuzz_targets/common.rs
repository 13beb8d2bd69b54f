//! A per-process scratch folder: the loaders under test read files, as they do for users.
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn scratch(name: &str, data: &[u8]) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lcm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}
