//! Where the Claude Code CLI keeps a session's transcript:
//! `$HOME/.claude/projects/<slug>/<session_id>.jsonl` (`docs/claude-code.md` §9).
//!
//! A worker needs this to decide between `--session-id` (new) and `--resume` (existing),
//! because resuming an id without a transcript fails and starting an id that already has one
//! is refused.

use std::path::{Path, PathBuf};

use uuid::Uuid;

/// The directory holding one directory per project (workspace).
pub fn projects_dir(home: &Path) -> PathBuf {
    home.join(".claude").join("projects")
}

/// The CLI's project directory name for a workspace: the absolute cwd with every character
/// outside `[A-Za-z0-9]` replaced by `-`, without collapsing runs (`/a/b_c.d` → `-a-b-c-d`).
///
/// The CLI is JavaScript and replaces UTF-16 code units, so a character outside the Basic
/// Multilingual Plane (an emoji) becomes two dashes; we do the same. Very long slugs are
/// truncated and hashed by the CLI, which this function does not reproduce: use
/// [`find_transcript`] to locate an existing transcript.
pub fn project_slug(cwd: &Path) -> String {
    let mut slug = String::new();
    for c in cwd.to_string_lossy().chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else {
            slug.extend(std::iter::repeat_n('-', c.len_utf16()));
        }
    }
    slug
}

/// Where a new session started in `cwd` writes its transcript.
pub fn transcript_path(home: &Path, cwd: &Path, session_id: Uuid) -> PathBuf {
    projects_dir(home)
        .join(project_slug(cwd))
        .join(format!("{session_id}.jsonl"))
}

/// The transcript of `session_id` in any project directory, if it exists and is non-empty
/// (an empty file cannot be resumed). The CLI's `--resume` searches the same way, so a
/// session can be resumed from another cwd. Should several directories hold the id, the most
/// recently modified file wins.
pub fn find_transcript(home: &Path, session_id: Uuid) -> Option<PathBuf> {
    let name = format!("{session_id}.jsonl");
    let entries = std::fs::read_dir(projects_dir(home)).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path().join(&name);
            let meta = std::fs::metadata(&path).ok()?;
            (meta.is_file() && meta.len() > 0).then(|| (meta.modified().ok(), path))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "8f14e45f-ceea-4672-a7b8-e4c3f1d2a9b0";

    fn id() -> Uuid {
        Uuid::parse_str(ID).expect("uuid")
    }

    #[test]
    fn slugs() {
        assert_eq!(project_slug(Path::new("/a/b_c.d")), "-a-b-c-d");
        assert_eq!(
            project_slug(Path::new("/home/u/my project//x")),
            "-home-u-my-project--x"
        );
        assert_eq!(project_slug(Path::new("/tmp/été")), "-tmp--t-");
        assert_eq!(project_slug(Path::new("/tmp/😀")), "-tmp---");
        assert_eq!(project_slug(Path::new("/ABC/xyz09")), "-ABC-xyz09");
    }

    #[test]
    fn path_layout() {
        let p = transcript_path(Path::new("/h"), Path::new("/w/s-1"), id());
        assert_eq!(
            p,
            PathBuf::from(format!("/h/.claude/projects/-w-s-1/{ID}.jsonl"))
        );
    }

    #[test]
    fn finds_by_name_in_any_project() {
        let home = tempfile::tempdir().expect("tempdir");
        assert_eq!(find_transcript(home.path(), id()), None);

        // An empty file does not count.
        let empty = transcript_path(home.path(), Path::new("/one"), id());
        std::fs::create_dir_all(empty.parent().expect("parent")).expect("mkdir");
        std::fs::write(&empty, "").expect("write");
        assert_eq!(find_transcript(home.path(), id()), None);

        // A truncated+hashed slug the CLI made up is still found by file name.
        let odd = projects_dir(home.path()).join("-very-long-trunc-1a2b3c");
        std::fs::create_dir_all(&odd).expect("mkdir");
        let file = odd.join(format!("{ID}.jsonl"));
        std::fs::write(&file, "{\"type\":\"user\"}\n").expect("write");
        assert_eq!(find_transcript(home.path(), id()), Some(file));

        // Another id is not confused with it.
        assert_eq!(find_transcript(home.path(), Uuid::new_v4()), None);
        // Stray files in projects/ are ignored.
        std::fs::write(projects_dir(home.path()).join("stray"), "x").expect("write");
        assert!(find_transcript(home.path(), id()).is_some());
    }
}
