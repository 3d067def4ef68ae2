//! Token estimates before the upstream counts: the prompt of a request at admission, and the
//! output of a response that reports no `usage`.
//!
//! tiktoken's BPE tables are embedded in the binary (nothing is downloaded); loading one takes
//! about half a second, so the daemon loads it at start-up rather than on the first request.
use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::tiers::TokenizerName;

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
    pub fn prompt_tokens(&self, body: &Value) -> u64 {
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

/// Most completion tokens one request may ask for: beyond any model's context, and small
/// enough that reservations and counters never come near overflowing.
pub const MAX_COMPLETION_TOKENS: u64 = 100_000_000;

/// The most completion tokens a request allows, from whichever field its API uses.
pub fn max_completion_tokens(body: &Value) -> Option<u64> {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| body.get(*f).and_then(Value::as_u64))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn max_tokens_fields() {
        assert_eq!(
            max_completion_tokens(&serde_json::json!({"max_tokens": 5})),
            Some(5)
        );
        assert_eq!(
            max_completion_tokens(
                &serde_json::json!({"max_completion_tokens": 7, "max_tokens": 5})
            ),
            Some(7)
        );
        assert_eq!(max_completion_tokens(&serde_json::json!({})), None);
    }
}
