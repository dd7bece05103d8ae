//! What a checkpoint path given by a user names.

use std::path::{Path, PathBuf};

use super::CHECKPOINT_FILE;

/// A checkpoint path as given by a user: a directory means `<dir>/checkpoint.safetensors`.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Where to write a checkpoint given a user's path: a path ending in `.safetensors` is the
/// file; anything else is a directory (existing or not) that holds [`CHECKPOINT_FILE`].
pub fn resolve_for_write(path: &Path) -> PathBuf {
    let is_file = !path.is_dir()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_file {
        path.to_path_buf()
    } else {
        path.join(CHECKPOINT_FILE)
    }
}
