//! The topic matcher: a trie over the words of binding patterns, so routing a key costs the
//! key's length (times the `#`s on the way), not the number of bindings.
//!
//! A routing key and a pattern are split on `.` into words; the empty key has no words, and
//! `a..b` has an empty middle word. In a pattern, `*` matches exactly one word and `#` zero or
//! more words. Any other word matches itself only.

use std::collections::HashMap;

/// Bindings of a topic exchange, by pattern, to destinations of type `D`.
#[derive(Debug, Clone)]
pub struct TopicTrie<D> {
    root: Node<D>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<D> {
    words: HashMap<Box<str>, Node<D>>,
    star: Option<Box<Node<D>>>,
    hash: Option<Box<Node<D>>>,
    /// Destinations of the patterns that end here.
    bound: Vec<D>,
}

impl<D> Default for Node<D> {
    fn default() -> Self {
        Node { words: HashMap::new(), star: None, hash: None, bound: Vec::new() }
    }
}

impl<D> Default for TopicTrie<D> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), len: 0 }
    }
}

/// The words of a key or pattern: none for the empty string.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    let empty = text.is_empty();
    text.split('.').filter(move |_| !empty)
}

impl<D: PartialEq> TopicTrie<D> {
    /// Binds `pattern` to `destination`; false if that binding exists.
    pub fn insert(&mut self, pattern: &str, destination: D) -> bool {
        let mut node = &mut self.root;
        for word in words(pattern) {
            node = match word {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                word => node.words.entry(word.into()).or_default(),
            };
        }
        if node.bound.contains(&destination) {
            return false;
        }
        node.bound.push(destination);
        self.len += 1;
        true
    }

    /// Unbinds `pattern` from `destination`; false if there was no such binding.
    pub fn remove(&mut self, pattern: &str, destination: &D) -> bool {
        let removed = remove_at(&mut self.root, &words(pattern).collect::<Vec<_>>(), destination);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Bindings held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True without bindings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `found` with the destination of every pattern that matches `key` (a destination
    /// bound by several matching patterns comes once per pattern).
    pub fn matches<'a>(&'a self, key: &str, found: &mut impl FnMut(&'a D)) {
        let key: Vec<&str> = words(key).collect();
        walk(&self.root, &key, found);
    }
}

fn walk<'a, D>(node: &'a Node<D>, key: &[&str], found: &mut impl FnMut(&'a D)) {
    if let Some(hash) = &node.hash {
        // `#` takes zero or more words: try every split.
        for skip in 0..=key.len() {
            walk(hash, &key[skip..], found);
        }
    }
    let Some((first, rest)) = key.split_first() else {
        node.bound.iter().for_each(found);
        return;
    };
    if let Some(child) = node.words.get(*first) {
        walk(child, rest, found);
    }
    if let Some(star) = &node.star {
        walk(star, rest, found);
    }
}

/// Removes the binding; prunes nodes left empty. True if it was there.
fn remove_at<D: PartialEq>(node: &mut Node<D>, pattern: &[&str], destination: &D) -> bool {
    let Some((first, rest)) = pattern.split_first() else {
        let before = node.bound.len();
        node.bound.retain(|d| d != destination);
        return node.bound.len() < before;
    };
    let empty =
        |n: &Node<D>| n.bound.is_empty() && n.words.is_empty() && n.star.is_none() && n.hash.is_none();
    match *first {
        "*" | "#" => {
            let slot = if *first == "*" { &mut node.star } else { &mut node.hash };
            let Some(child) = slot.as_deref_mut() else { return false };
            let removed = remove_at(child, rest, destination);
            if empty(child) {
                *slot = None;
            }
            removed
        }
        word => {
            let Some(child) = node.words.get_mut(word) else { return false };
            let removed = remove_at(child, rest, destination);
            if empty(child) {
                node.words.remove(word);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matcher the trie must agree with: pattern words against key words, directly.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && reference(rest, &key[1..]),
        }
    }

    fn matched(trie: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut found = Vec::new();
        trie.matches(key, &mut |d| found.push(*d));
        found.sort_unstable();
        found.dedup();
        found
    }

    #[test]
    fn the_tutorial_patterns_route_as_documented() {
        let mut trie = TopicTrie::default();
        trie.insert("*.orange.*", 1);
        trie.insert("*.*.rabbit", 2);
        trie.insert("lazy.#", 2);
        for (key, expected) in [
            ("quick.orange.rabbit", vec![1, 2]),
            ("lazy.orange.elephant", vec![1, 2]),
            ("quick.orange.fox", vec![1]),
            ("lazy.brown.fox", vec![2]),
            ("lazy.pink.rabbit", vec![2]),
            ("quick.brown.fox", vec![]),
            ("orange", vec![]),
            ("quick.orange.new.rabbit", vec![]),
            ("lazy.orange.new.rabbit", vec![2]),
            ("lazy", vec![2]),
        ] {
            assert_eq!(matched(&trie, key), expected, "{key}");
        }
    }

    #[test]
    fn hash_alone_matches_everything_and_empty_words_count() {
        let mut trie = TopicTrie::default();
        trie.insert("#", 1);
        trie.insert("a..b", 2);
        trie.insert("", 3);
        assert_eq!(matched(&trie, ""), vec![1, 3]);
        assert_eq!(matched(&trie, "a..b"), vec![1, 2]);
        assert_eq!(matched(&trie, "a.b"), vec![1]);
    }

    #[test]
    fn removing_a_binding_unroutes_it_and_prunes_the_trie() {
        let mut trie = TopicTrie::default();
        assert!(trie.insert("a.*.#", 1));
        assert!(!trie.insert("a.*.#", 1), "a binding exists once");
        assert!(trie.insert("a.*.#", 2));
        assert!(trie.remove("a.*.#", &1));
        assert!(!trie.remove("a.*.#", &1));
        assert_eq!(matched(&trie, "a.b.c"), vec![2]);
        assert!(trie.remove("a.*.#", &2));
        assert!(trie.is_empty() && trie.root.words.is_empty(), "nothing left behind");
    }

    /// A small deterministic generator (xorshift), so the property runs the same every time.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn the_trie_agrees_with_the_reference_matcher() {
        const WORDS: [&str; 6] = ["a", "b", "c", "", "*", "#"];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pattern_of = |rng: &mut Rng, wild: bool| -> Vec<&'static str> {
            let len = rng.below(6);
            (0..len).map(|_| WORDS[rng.below(if wild { 6 } else { 4 })]).collect()
        };
        for _ in 0..300 {
            let patterns: Vec<Vec<&str>> = (0..20).map(|_| pattern_of(&mut rng, true)).collect();
            let mut trie = TopicTrie::default();
            for (i, pattern) in patterns.iter().enumerate() {
                trie.insert(&pattern.join("."), i as u32);
            }
            for _ in 0..30 {
                let key = pattern_of(&mut rng, false);
                // A one-word key of "" joins to the empty key, which has no words.
                let joined_key = key.join(".");
                let key_words: Vec<&str> = words(&joined_key).collect();
                let expected: Vec<u32> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| {
                        let joined = p.join(".");
                        reference(&words(&joined).collect::<Vec<_>>(), &key_words)
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                assert_eq!(matched(&trie, &key.join(".")), expected, "key {key:?} patterns {patterns:?}");
            }
        }
    }
}
