//! Keys that moved: a config written for an older swiftbrush is refused
//! with a message that names where each key went, instead of the generic
//! "unknown key" (which would not say what to write instead).

use serde_norway::Value;

/// (old key, new key, what changed).
const MOVED: [(&str, &str, &str); 2] = [
    (
        "method.lora.optimizer",
        "method.fake_score.optimizer",
        "the fake score's optimizer, for either form",
    ),
    (
        "method.lora.updates_per_step",
        "method.fake_score.updates_per_step",
        "the fake score's updates per step, for either form",
    ),
];

/// The first moved key `text` uses, as a sentence naming the new key; None
/// when it uses none (or is not YAML at all: the typed parse reports that).
pub(crate) fn moved_key(text: &str) -> Option<String> {
    let root: Value = serde_norway::from_str(text).ok()?;
    let method = root.get("method")?;
    if let Some(kind) = method.get("fake_score").and_then(Value::as_str) {
        return Some(format!(
            "method.fake_score: `fake_score: {kind}` is now a section; write \
             `fake_score:` with `kind: {kind}` under it (method.fake_score.kind), \
             beside the fake score's optimizer and updates_per_step"
        ));
    }
    MOVED.iter().find_map(|(old, new, what)| {
        let mut parts = old.split('.');
        let first = parts.next()?;
        let mut node = root.get(first)?;
        for part in parts {
            node = node.get(part)?;
        }
        Some(format!("{old} has moved to {new} ({what})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_keys_are_named_with_their_new_place() {
        let e = moved_key("method:\n  lora:\n    optimizer:\n      lr: 1\n").unwrap();
        assert!(e.contains("method.fake_score.optimizer"), "{e}");
        let e = moved_key("method:\n  lora:\n    updates_per_step: 2\n").unwrap();
        assert!(e.contains("method.fake_score.updates_per_step"), "{e}");
        let e = moved_key("method:\n  fake_score: unet\n").unwrap();
        assert!(
            e.contains("method.fake_score.kind") && e.contains("kind: unet"),
            "{e}"
        );
    }

    #[test]
    fn current_configs_and_non_yaml_pass_through() {
        let current = "method:\n  fake_score:\n    kind: unet\n    updates_per_step: 2\n  lora:\n    rank: 4\n";
        assert_eq!(moved_key(current), None);
        assert_eq!(moved_key("name: x\n"), None);
        assert_eq!(moved_key("{{{ not yaml"), None);
    }
}
