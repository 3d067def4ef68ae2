//! Token estimates before the upstream counts: the prompt of a request at admission, and the
//! output of a response that reports no `usage`.
//!
//! tiktoken's BPE tables are embedded in the binary (nothing is downloaded); loading one takes
//! about half a second, so the daemon loads it at start-up rather than on the first request.
use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::tiers::TokenizerName;

mod shape;
pub use shape::Shape;

/// A loaded tokenizer.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: &'static CoreBPE,
    /// Tokens of each of [`ROLES`], counted once at load (every message names one).
    role_tokens: [u64; ROLES.len()],
}

/// The chat roles, whose tokens are counted once.
const ROLES: [&str; 6] = [
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
];

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokenizer")
    }
}

/// Tokens the chat format adds per message and to prime the reply (OpenAI's published
/// counting recipe).
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

impl Tokenizer {
    pub fn load(name: TokenizerName) -> Self {
        let bpe = match name {
            TokenizerName::O200kBase => tiktoken_rs::o200k_base_singleton(),
            TokenizerName::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        let mut role_tokens = [0; ROLES.len()];
        for (n, role) in role_tokens.iter_mut().zip(ROLES) {
            *n = bpe.count_ordinary(role) as u64;
        }
        Self { bpe, role_tokens }
    }

    /// Tokens of a message's role.
    fn count_role(&self, role: &str) -> u64 {
        match ROLES.iter().position(|r| *r == role) {
            Some(i) => self.role_tokens[i],
            None => self.count(role),
        }
    }

    /// Tokens of plain text.
    pub fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        self.bpe.count_ordinary(text) as u64
    }

    /// The prompt tokens of an OpenAI-style request body: chat `messages`, completions
    /// `prompt`, embeddings or responses `input`, plus `instructions` and tool definitions
    /// (see [`Shape`], which the gateway reads straight from the body's bytes).
    pub fn prompt_tokens(&self, body: &Value) -> u64 {
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        self.shape(&bytes).map_or(0, |s| s.prompt_tokens)
    }
}

/// Most completion tokens one request may ask for: beyond any model's context, and small
/// enough that reservations and counters never come near overflowing.
pub const MAX_COMPLETION_TOKENS: u64 = 100_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// How prompt tokens were counted by walking a `Value` tree: the reference the one-pass
    /// reader must agree with.
    struct Oracle(Tokenizer);

    impl Oracle {
        fn count(&self, text: &str) -> u64 {
            self.0.count(text)
        }

        fn count_role(&self, role: &str) -> u64 {
            self.0.count(role)
        }

        /// Tokens of a JSON value that carries text: a string, an array of strings or of content
        /// parts (`{"type":"text","text":...}`), or token ids (counted one each).
        fn count_value(&self, v: &Value) -> u64 {
            match v {
                Value::String(s) => self.count(s),
                Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        Value::Number(_) => 1,
                        Value::Object(o) => o
                            .get("text")
                            .or_else(|| o.get("content"))
                            .map(|t| self.count_value(t))
                            .unwrap_or(0),
                        other => self.count_value(other),
                    })
                    .sum(),
                Value::Object(o) => o
                    .get("text")
                    .or_else(|| o.get("content"))
                    .map(|t| self.count_value(t))
                    .unwrap_or(0),
                _ => 0,
            }
        }

        /// The prompt tokens of an OpenAI-style request body: chat `messages`, completions
        /// `prompt`, embeddings or responses `input`, plus `instructions` and tool definitions.
        fn prompt_tokens(&self, body: &Value) -> u64 {
            let mut n = 0;
            if let Some(Value::Array(messages)) = body.get("messages") {
                for m in messages {
                    n += PER_MESSAGE;
                    if let Some(role) = m.get("role").and_then(Value::as_str) {
                        n += self.count_role(role);
                    }
                    if let Some(c) = m.get("content") {
                        n += self.count_value(c);
                    }
                    if let Some(name) = m.get("name").and_then(Value::as_str) {
                        n += 1 + self.count(name);
                    }
                }
                n += REPLY_PRIMING;
            }
            for field in ["prompt", "input", "instructions"] {
                if let Some(v) = body.get(field) {
                    n += self.count_value(v);
                }
            }
            if let Some(tools) = body.get("tools") {
                // Tool schemas reach the model as text: their JSON length is a fair estimate.
                n += self.count(&tools.to_string());
            }
            n
        }
    }

    #[test]
    fn chat_prompt_is_counted_like_openai() {
        let t = Tokenizer::load(TokenizerName::O200kBase);
        let body = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hello world"}]
        });
        // 3 per message + "user" (1) + "hello world" (2) + 3 priming.
        assert_eq!(t.prompt_tokens(&body), 9);
        let parts = serde_json::json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
        });
        assert_eq!(t.prompt_tokens(&parts), 9);
        assert_eq!(
            t.prompt_tokens(&serde_json::json!({"prompt": [1, 2, 3]})),
            3
        );
    }

    #[test]
    fn roles_counted_once_count_as_the_tokenizer_does() {
        for name in [TokenizerName::O200kBase, TokenizerName::Cl100kBase] {
            let t = Tokenizer::load(name);
            for role in ROLES.iter().chain(&["narrator", ""]) {
                assert_eq!(t.count_role(role), t.count(role), "{role}");
            }
        }
    }

    /// What looking fields up in the body's `Value` gives: the reference for the one-pass
    /// reader's fields.
    fn by_value(t: Tokenizer, body: &[u8]) -> Shape {
        let v: Value = serde_json::from_slice(body).expect("valid JSON");
        let u64_of = |f: &str| v.get(f).and_then(Value::as_u64);
        Shape {
            is_object: v.is_object(),
            model: v.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: v.get("stream").and_then(Value::as_bool),
            include_usage: v
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool),
            n: u64_of("n"),
            best_of: u64_of("best_of"),
            has_messages: v.get("messages").is_some(),
            has_prompt: v.get("prompt").is_some(),
            has_input: v.get("input").is_some(),
            has_model: v.get("model").is_some(),
            prompt_tokens: Oracle(t).prompt_tokens(&v),
            max_completion_tokens: u64_of("max_completion_tokens"),
            max_tokens: u64_of("max_tokens"),
            max_output_tokens: u64_of("max_output_tokens"),
        }
    }

    #[test]
    fn one_pass_reads_a_body_as_its_value_tree_does() {
        let t = Tokenizer::load(TokenizerName::O200kBase);
        for body in [
            r#"{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":[1]},"n":3,"best_of":2}"#,
            r#"{"messages":[{"role":"system","content":"be brief","name":"bot"},{"role":"user","content":[{"type":"text","text":"a b"},{"type":"image_url","image_url":{"url":"x"}},{"content":"c d"},{"text":"e","content":"ignored"},"plain",7,[1,2,[3]]]}]}"#,
            r#"{"messages":"not an array","prompt":[1,2,3],"input":{"content":"x y z"},"instructions":"stay calm"}"#,
            r#"{"messages":[1,"two",null,true,[],{}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
            r#"{"max_tokens":5,"max_tokens":"five","max_output_tokens":9,"max_completion_tokens":-1}"#,
            r#"{"model":7,"stream":"yes","stream_options":[true],"n":2.5,"best_of":null}"#,
            r#"{"messages":[{"role":"user","content":"first"}],"messages":[{"role":"narrator","content":"second wins","role":"tool"}]}"#,
            r#"{"prompt":"caf\u00e9 \"quoted\"\n","model":"m\u00fcll","input":"x","model":"last"}"#,
            r#"[{"messages":[]}]"#,
            r#""just a string""#,
            r#"{}"#,
        ] {
            assert_eq!(
                t.shape(body.as_bytes()).expect("valid"),
                by_value(t, body.as_bytes()),
                "{body}"
            );
        }
        assert!(t.shape(br#"{"model": "#).is_err());
        assert!(t.shape(br#"{"a":1} trailing"#).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn one_pass_agrees_with_the_value_tree_on_any_body(v in arbitrary_body()) {
            let t = Tokenizer::load(TokenizerName::O200kBase);
            let bytes = serde_json::to_vec(&v).expect("serializes");
            proptest::prop_assert_eq!(t.shape(&bytes).expect("valid"), by_value(t, &bytes));
        }
    }

    /// JSON made of the fields the reader looks at (and others), nested as requests nest.
    fn arbitrary_body() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("messages"),
            Just("role"),
            Just("content"),
            Just("text"),
            Just("name"),
            Just("prompt"),
            Just("input"),
            Just("instructions"),
            Just("tools"),
            Just("model"),
            Just("stream"),
            Just("stream_options"),
            Just("include_usage"),
            Just("max_tokens"),
            Just("max_completion_tokens"),
            Just("max_output_tokens"),
            Just("n"),
            Just("best_of"),
            Just("type"),
            Just("other"),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u32>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            prop_oneof![
                Just("user"),
                Just("assistant"),
                Just("hello world"),
                Just(""),
                Just("caf\u{e9} \"x\"\n")
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    #[test]
    fn max_tokens_fields() {
        let t = Tokenizer::load(TokenizerName::O200kBase);
        let max = |b: &str| {
            t.shape(b.as_bytes())
                .expect("valid")
                .max_completion_tokens()
        };
        assert_eq!(max(r#"{"max_tokens": 5}"#), Some(5));
        assert_eq!(
            max(r#"{"max_completion_tokens": 7, "max_tokens": 5}"#),
            Some(7)
        );
        assert_eq!(max(r#"{"max_output_tokens": 9}"#), Some(9));
        assert_eq!(max(r#"{}"#), None);
    }
}
