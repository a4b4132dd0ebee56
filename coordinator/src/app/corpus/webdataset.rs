//! Captions from WebDataset `.tar` shards: consecutive members sharing a
//! key (the path up to the first dot of the file name) form a sample, and
//! a sample's caption is its `.txt` member, else its `.json` member read
//! with the `.jsonl` field rules. Members are read in order from a stream
//! (images and other members are skipped unread), so a shard is never held
//! whole. A sample without a usable caption is skipped and counted; a tar
//! that is corrupt or ends inside a member is an error naming the member.

use std::io::Read;

use swiftbrush_proto::caption_source::{CaptionError, Captions, json_caption, text_caption};
use tokio::runtime::Handle;

use super::object_read::ObjectStream;
use super::{CorpusError, Location, blocking, read_error};

pub(super) async fn load(
    source: &str,
    location: Location,
    field: Option<String>,
) -> Result<Captions, CorpusError> {
    let name = source.to_owned();
    match location {
        Location::Local(path) => {
            blocking(source, move || {
                let file =
                    std::fs::File::open(&path).map_err(|e| read_error(&name, e.to_string()))?;
                read_captions(&name, std::io::BufReader::new(file), field.as_deref())
            })
            .await
        }
        Location::Object { store, path } => {
            let handle = Handle::current();
            blocking(source, move || {
                let stream =
                    ObjectStream::open(handle, store, path).map_err(|e| read_error(&name, e))?;
                read_captions(&name, stream, field.as_deref())
            })
            .await
        }
    }
}

/// One sample's caption members.
struct Sample {
    key: String,
    txt: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
}

pub(super) fn read_captions<R: Read>(
    name: &str,
    reader: R,
    field: Option<&str>,
) -> Result<Captions, CorpusError> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| read_error(name, format!("not a readable tar: {e}")))?;
    let mut out = Captions::default();
    let mut sample: Option<Sample> = None;
    let mut last = String::from("the start");
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            read_error(
                name,
                format!("corrupt or truncated tar after member {last}: {e}"),
            )
        })?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| read_error(name, format!("a member's name after {last}: {e}")))?
            .to_string_lossy()
            .into_owned();
        last = path.clone();
        let Some((key, extension)) = split_key(&path) else {
            continue;
        };
        if sample.as_ref().is_some_and(|s| s.key != key) {
            finish(sample.take(), field, &mut out);
        }
        let current = sample.get_or_insert_with(|| Sample {
            key: key.to_owned(),
            txt: None,
            json: None,
        });
        let slot = match extension {
            "txt" => &mut current.txt,
            "json" => &mut current.json,
            _ => continue,
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| {
            read_error(
                name,
                format!("member {path} is truncated or unreadable: {e}"),
            )
        })?;
        *slot = Some(bytes);
    }
    finish(sample, field, &mut out);
    if out.captions.is_empty() {
        return Err(CaptionError::Empty {
            name: name.to_owned(),
            stats: out.skipped,
        }
        .into());
    }
    Ok(out)
}

/// WebDataset's split of a member path into sample key and extension:
/// the key is the folder plus the file name up to its first dot. Names
/// without a dot, or starting with one, belong to no sample.
fn split_key(path: &str) -> Option<(&str, &str)> {
    let base_at = path.rfind('/').map_or(0, |i| i + 1);
    let dot = base_at + path[base_at..].find('.')?;
    (dot > base_at).then(|| (&path[..dot], &path[dot + 1..]))
}

fn finish(sample: Option<Sample>, field: Option<&str>, out: &mut Captions) {
    let Some(sample) = sample else { return };
    let caption = match (&sample.txt, &sample.json) {
        (Some(txt), _) => text_caption(txt, &mut out.skipped),
        (None, Some(json)) => json_caption(json, field, &mut out.skipped),
        (None, None) => {
            out.skipped.missing_field += 1;
            None
        }
    };
    out.captions.extend(caption);
}

#[cfg(test)]
mod tests {
    use super::split_key;

    #[test]
    fn webdataset_keys() {
        assert_eq!(split_key("000001.txt"), Some(("000001", "txt")));
        assert_eq!(split_key("a/b.c/x.seg.json"), Some(("a/b.c/x", "seg.json")));
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("dir/.hidden.txt"), None);
    }
}
