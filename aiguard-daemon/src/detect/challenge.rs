//! Proof-of-work challenges (hashcash style) for sources that look suspicious but not
//! certainly hostile: a real client pays a fraction of a second of CPU per request, a flood
//! pays the same per request and slows down accordingly.
//!
//! # The exchange
//!
//! 1. A request from a challenged source without a valid proof gets HTTP 428 with an
//!    OpenAI-style JSON error and the headers `x-aiguard-challenge: <token>` and
//!    `x-aiguard-challenge-difficulty: <bits>`.
//! 2. The client finds any string `<solution>` (printable ASCII without ':', e.g. a decimal
//!    counter) such that SHA-256(`<token>:<solution>`) starts with at least `<bits>` zero
//!    bits, and repeats the request with `x-aiguard-proof: <token>:<solution>`.
//! 3. The gateway verifies that the token was made by this gateway for this source (an
//!    HMAC-SHA256 over the token's fields and the source prefix, so a token issued to one
//!    prefix is useless from another), that it has not expired, that its difficulty is at
//!    least the one required now, that the hash has enough zero bits, and that this exact
//!    proof was not used before: each proof passes once, and a client may solve many
//!    solutions for one token.
//!
//! # Wire format
//!
//! ```text
//! token    = "v1." expires "." difficulty "." nonce "." mac
//! expires  = 1*20DIGIT        ; Unix time in milliseconds; the token is void from then on
//! difficulty = 1*3DIGIT       ; zero bits required, the same value as the difficulty header
//! nonce    = 32LOWHEX         ; 16 random bytes
//! mac      = 64LOWHEX         ; HMAC-SHA256(secret, "v1.<expires>.<difficulty>.<nonce>" NUL subject)
//! proof    = token ":" solution
//! solution = 1*(%x21-39 / %x3B-7E)   ; visible ASCII except ':'
//! ```
//!
//! A proof is at most 512 bytes. The subject is the source prefix the gateway challenges
//! (e.g. `203.0.113.0/24`); it is not in the token, only in the MAC. The zero bits are
//! counted from the most significant bit of the first byte of the digest.
//!
//! Tokens are stateless: nothing is stored per issued token. Only used proofs are remembered,
//! until their token expires, in a bounded set; when the set is full and none of its entries
//! has expired, new proofs are refused ([`ProofError::Busy`]) rather than let it grow. The
//! set belongs to one gateway process: nodes that share a secret each accept a proof once.
//!
//! # A client
//!
//! ```python
//! import hashlib, itertools, requests
//!
//! def solve(token: str, bits: int) -> str:
//!     for n in itertools.count():
//!         digest = hashlib.sha256(f"{token}:{n}".encode()).digest()
//!         if int.from_bytes(digest, "big") >> (256 - bits) == 0:
//!             return f"{token}:{n}"
//!
//! r = requests.post(url, headers=headers, json=body)
//! if r.status_code == 428:
//!     proof = solve(r.headers["x-aiguard-challenge"],
//!                   int(r.headers["x-aiguard-challenge-difficulty"]))
//!     r = requests.post(url, headers={**headers, "x-aiguard-proof": proof}, json=body)
//! ```
use std::{
    collections::HashMap,
    fmt,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::config::{ConfigError, invalid};

/// Response header that carries the token.
pub const CHALLENGE_HEADER: &str = "x-aiguard-challenge";
/// Response header that carries the zero bits required.
pub const DIFFICULTY_HEADER: &str = "x-aiguard-challenge-difficulty";
/// Request header that carries `<token>:<solution>`.
pub const PROOF_HEADER: &str = "x-aiguard-proof";

/// Longest proof accepted: far more than a token and a counter need, short enough that a
/// header full of junk costs nothing to reject.
pub const MAX_PROOF_LEN: usize = 512;
/// Used proofs remembered at most (about 5 MB).
pub const DEFAULT_MAX_USED: usize = 100_000;

const VERSION: &str = "v1";
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// How hard the challenge is and how long a token stays good (`[detect.challenge]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChallengeSettings {
    /// Leading zero bits required: each bit doubles the client's expected work (20 bits is
    /// about a million hashes, a few milliseconds in native code, about a second in Python).
    pub difficulty: u8,
    /// How long a token can be answered; proofs are remembered as long.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
}

impl Default for ChallengeSettings {
    fn default() -> Self {
        Self {
            difficulty: 20,
            token_ttl: Duration::from_secs(300),
        }
    }
}

impl ChallengeSettings {
    /// Difficulty 1 to 32 (beyond 32 bits no client finishes), token lifetime 1 s to 1 h.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=32).contains(&self.difficulty) {
            return Err(invalid(
                "detect.challenge.difficulty",
                self.difficulty,
                "a number of zero bits from 1 to 32, e.g. 20",
            ));
        }
        if self.token_ttl < Duration::from_secs(1) || self.token_ttl > Duration::from_secs(3600) {
            return Err(invalid(
                "detect.challenge.token_ttl",
                format!(
                    "{:?}",
                    humantime::format_duration(self.token_ttl).to_string()
                ),
                "a duration from 1s to 1h, e.g. \"5m\"",
            ));
        }
        Ok(())
    }
}

/// Why a proof was refused. Each message tells the client what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error(
        "malformed x-aiguard-proof header ({0}): send `<token>:<solution>` with the token from the x-aiguard-challenge header"
    )]
    Malformed(&'static str),
    #[error(
        "the challenge token was not issued to this client by this gateway: repeat the request without x-aiguard-proof to get a new challenge"
    )]
    Forged,
    #[error(
        "the challenge token has expired: repeat the request without x-aiguard-proof to get a new challenge"
    )]
    Expired,
    #[error(
        "the challenge token asks for {token} zero bits but {required} are required now: repeat the request without x-aiguard-proof to get a new challenge"
    )]
    TooEasy { token: u8, required: u8 },
    #[error(
        "SHA-256 of the proof does not start with the number of zero bits in x-aiguard-challenge-difficulty: find another solution"
    )]
    NotSolved,
    #[error(
        "this proof was already used and each proof passes once: find another solution for the token, or get a new challenge"
    )]
    Replayed,
    #[error("too many proofs to remember right now: retry later")]
    Busy,
}

/// A challenge as the gateway sends it: the token and the difficulty read together, so the
/// header always matches the token even while the settings are being reloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub token: String,
    pub difficulty: u8,
    pub expires_ms: u64,
}

/// Issues and verifies challenge tokens. Shared by all connections.
pub struct Challenger {
    /// Keyed once; cloned per token, which skips hashing the key again.
    mac: HmacSha256,
    difficulty: AtomicU8,
    token_ttl_ms: AtomicU64,
    used: Mutex<UsedProofs>,
}

impl fmt::Debug for Challenger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenger")
            .field("settings", &self.settings())
            .field("remembered", &self.remembered())
            .finish_non_exhaustive()
    }
}

impl Challenger {
    /// `secret` must be dedicated to challenges; nodes behind one balancer share it so a token
    /// from one is good at another.
    pub fn new(secret: [u8; 32], settings: ChallengeSettings) -> Self {
        Self::with_capacity(secret, settings, DEFAULT_MAX_USED)
    }

    /// A secret of this process only: tokens die with it, which a restart can afford.
    pub fn with_random_secret(settings: ChallengeSettings) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self::new(secret, settings)
    }

    /// Remembers at most `max_used` used proofs.
    pub fn with_capacity(secret: [u8; 32], settings: ChallengeSettings, max_used: usize) -> Self {
        Self {
            mac: HmacSha256::new_from_slice(&secret).expect("HMAC takes keys of any length"),
            difficulty: AtomicU8::new(settings.difficulty),
            token_ttl_ms: AtomicU64::new(duration_ms(settings.token_ttl)),
            used: Mutex::new(UsedProofs::new(max_used)),
        }
    }

    /// Takes validated settings on a reload. Tokens already issued keep their expiry; tokens
    /// below a raised difficulty are refused from now on.
    pub fn set_settings(&self, settings: ChallengeSettings) {
        self.difficulty
            .store(settings.difficulty, Ordering::Relaxed);
        self.token_ttl_ms
            .store(duration_ms(settings.token_ttl), Ordering::Relaxed);
    }

    pub fn settings(&self) -> ChallengeSettings {
        ChallengeSettings {
            difficulty: self.difficulty(),
            token_ttl: Duration::from_millis(self.token_ttl_ms.load(Ordering::Relaxed)),
        }
    }

    /// Zero bits required now.
    pub fn difficulty(&self) -> u8 {
        self.difficulty.load(Ordering::Relaxed)
    }

    /// Used proofs remembered now (a gauge for metrics).
    pub fn remembered(&self) -> usize {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// A fresh token for `subject` (the source prefix, e.g. "203.0.113.0/24").
    pub fn issue(&self, subject: &str, now_ms: u64) -> String {
        self.challenge(subject, now_ms).token
    }

    /// A fresh token for `subject` with the difficulty and expiry it carries.
    pub fn challenge(&self, subject: &str, now_ms: u64) -> Challenge {
        let settings = self.settings();
        let expires_ms = now_ms.saturating_add(duration_ms(settings.token_ttl));
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let body = format!(
            "{VERSION}.{expires_ms}.{}.{}",
            settings.difficulty,
            hex(&nonce)
        );
        let tag = self.tag(&body, subject);
        Challenge {
            token: format!("{body}.{}", hex(&tag)),
            difficulty: settings.difficulty,
            expires_ms,
        }
    }

    /// Accepts `proof` (the `x-aiguard-proof` value) from `subject` once.
    pub fn verify(&self, subject: &str, proof: &str, now_ms: u64) -> Result<(), ProofError> {
        let token = parse_proof(proof)?;
        let expected = self.tag(token.body, subject);
        if !bool::from(expected.ct_eq(&token.mac)) {
            return Err(ProofError::Forged);
        }
        if now_ms >= token.expires_ms {
            return Err(ProofError::Expired);
        }
        let required = self.difficulty();
        if token.difficulty < required {
            return Err(ProofError::TooEasy {
                token: token.difficulty,
                required,
            });
        }
        let digest: [u8; 32] = Sha256::digest(proof.as_bytes()).into();
        if leading_zero_bits(&digest) < u32::from(token.difficulty) {
            return Err(ProofError::NotSolved);
        }
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest, token.expires_ms, now_ms)
    }

    fn tag(&self, body: &str, subject: &str) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body.as_bytes());
        // The body is visible ASCII, so the NUL marks where the subject starts.
        mac.update(&[0]);
        mac.update(subject.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Reference solver (tests, docs, the benchmark): tries solutions 0, 1, 2, ... in order and
/// returns the first that works (the solution only; the proof is `<token>:<solution>`).
pub fn solve(token: &str, difficulty: u8) -> String {
    let mut prefix = Sha256::new();
    prefix.update(token.as_bytes());
    prefix.update(b":");
    let mut n: u64 = 0;
    loop {
        let solution = n.to_string();
        let digest: [u8; 32] = prefix
            .clone()
            .chain_update(solution.as_bytes())
            .finalize()
            .into();
        if leading_zero_bits(&digest) >= u32::from(difficulty) {
            return solution;
        }
        n += 1;
    }
}

/// Zero bits at the start of `hash`, from the most significant bit of the first byte.
pub fn leading_zero_bits(hash: &[u8; 32]) -> u32 {
    let mut bits = 0;
    for &byte in hash {
        if byte != 0 {
            return bits + byte.leading_zeros();
        }
        bits += 8;
    }
    bits
}

/// The token part of a proof, checked for shape only.
struct ParsedToken<'a> {
    /// What the MAC covers: `v1.<expires>.<difficulty>.<nonce>`, exactly as received.
    body: &'a str,
    expires_ms: u64,
    difficulty: u8,
    mac: [u8; MAC_LEN],
}

fn parse_proof(proof: &str) -> Result<ParsedToken<'_>, ProofError> {
    use ProofError::Malformed;
    if proof.len() > MAX_PROOF_LEN {
        return Err(Malformed("longer than 512 bytes"));
    }
    if !proof.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Malformed("only visible ASCII characters are allowed"));
    }
    let (token, solution) = proof
        .split_once(':')
        .ok_or(Malformed("no ':' between token and solution"))?;
    if solution.is_empty() {
        return Err(Malformed("empty solution"));
    }
    if solution.contains(':') {
        return Err(Malformed("the solution must not contain ':'"));
    }
    let (body, mac_hex) = token.rsplit_once('.').ok_or(Malformed("not a token"))?;
    let mut fields = body.split('.');
    let (Some(version), Some(expires), Some(difficulty), Some(nonce), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Malformed("not a token"));
    };
    if version != VERSION {
        return Err(Malformed("unknown token version"));
    }
    let expires_ms = decimal(expires, 20).ok_or(Malformed("bad expiry in token"))?;
    let difficulty = decimal(difficulty, 3)
        .and_then(|d| u8::try_from(d).ok())
        .ok_or(Malformed("bad difficulty in token"))?;
    if unhex::<NONCE_LEN>(nonce).is_none() {
        return Err(Malformed("bad nonce in token"));
    }
    let mac = unhex::<MAC_LEN>(mac_hex).ok_or(Malformed("bad MAC in token"))?;
    Ok(ParsedToken {
        body,
        expires_ms,
        difficulty,
        mac,
    })
}

/// Digits only (no sign, no spaces), at most `max_digits` of them.
fn decimal(s: &str, max_digits: usize) -> Option<u64> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Lowercase hex only: the MAC covers the text as sent, so there is one spelling per token.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Digests of used proofs with the expiry of their token; bounded.
struct UsedProofs {
    expiry: HashMap<[u8; 32], u64>,
    max: usize,
    /// The earliest expiry in `expiry` (`u64::MAX` when empty): while `now` is before it,
    /// nothing can be dropped and a full set refuses at once instead of scanning.
    earliest_ms: u64,
}

impl UsedProofs {
    fn new(max: usize) -> Self {
        Self {
            expiry: HashMap::new(),
            max,
            earliest_ms: u64::MAX,
        }
    }

    fn len(&self) -> usize {
        self.expiry.len()
    }

    fn insert(&mut self, digest: [u8; 32], expires_ms: u64, now_ms: u64) -> Result<(), ProofError> {
        if self.expiry.contains_key(&digest) {
            return Err(ProofError::Replayed);
        }
        if self.expiry.len() >= self.max {
            if now_ms >= self.earliest_ms {
                self.expiry.retain(|_, &mut e| e > now_ms);
                self.earliest_ms = self.expiry.values().copied().min().unwrap_or(u64::MAX);
            }
            if self.expiry.len() >= self.max {
                return Err(ProofError::Busy);
            }
        }
        self.expiry.insert(digest, expires_ms);
        self.earliest_ms = self.earliest_ms.min(expires_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "203.0.113.0/24";
    const NOW: u64 = 1_700_000_000_000;

    fn settings(difficulty: u8) -> ChallengeSettings {
        ChallengeSettings {
            difficulty,
            token_ttl: Duration::from_secs(60),
        }
    }

    fn challenger(difficulty: u8) -> Challenger {
        Challenger::new([7; 32], settings(difficulty))
    }

    fn proof(token: &str, difficulty: u8) -> String {
        format!("{token}:{}", solve(token, difficulty))
    }

    /// A solution that fails: the first counter whose hash has too few zero bits.
    fn wrong_proof(token: &str, difficulty: u8) -> String {
        (0u64..)
            .map(|n| format!("{token}:{n}"))
            .find(|p| {
                let d: [u8; 32] = Sha256::digest(p.as_bytes()).into();
                leading_zero_bits(&d) < u32::from(difficulty)
            })
            .unwrap()
    }

    #[test]
    fn round_trip() {
        let c = challenger(16);
        let ch = c.challenge(SUBJECT, NOW);
        assert_eq!(ch.difficulty, 16);
        assert_eq!(ch.expires_ms, NOW + 60_000);
        assert!(ch.token.bytes().all(|b| b.is_ascii_graphic()));
        assert!(ch.token.starts_with(&format!("v1.{}.16.", NOW + 60_000)));
        let p = proof(&ch.token, 16);
        assert_eq!(c.verify(SUBJECT, &p, NOW + 1), Ok(()));
        assert_eq!(c.remembered(), 1);
    }

    #[test]
    fn tokens_differ() {
        let c = challenger(8);
        assert_ne!(c.issue(SUBJECT, NOW), c.issue(SUBJECT, NOW));
    }

    #[test]
    fn replay_is_refused_but_other_solutions_pass() {
        let c = challenger(8);
        let token = c.issue(SUBJECT, NOW);
        let first = proof(&token, 8);
        assert_eq!(c.verify(SUBJECT, &first, NOW), Ok(()));
        assert_eq!(c.verify(SUBJECT, &first, NOW), Err(ProofError::Replayed));
        let n: u64 = first.rsplit_once(':').unwrap().1.parse().unwrap();
        let second = (n + 1..)
            .map(|n| format!("{token}:{n}"))
            .find(|p| {
                let d: [u8; 32] = Sha256::digest(p.as_bytes()).into();
                leading_zero_bits(&d) >= 8
            })
            .unwrap();
        assert_eq!(c.verify(SUBJECT, &second, NOW), Ok(()));
    }

    #[test]
    fn other_subject_is_forged() {
        let c = challenger(8);
        let p = proof(&c.issue(SUBJECT, NOW), 8);
        assert_eq!(
            c.verify("198.51.100.0/24", &p, NOW),
            Err(ProofError::Forged)
        );
        assert_eq!(c.verify(SUBJECT, &p, NOW), Ok(()));
    }

    #[test]
    fn other_secret_is_forged() {
        let p = proof(&challenger(8).issue(SUBJECT, NOW), 8);
        let other = Challenger::new([8; 32], settings(8));
        assert_eq!(other.verify(SUBJECT, &p, NOW), Err(ProofError::Forged));
    }

    #[test]
    fn tampered_fields_are_forged() {
        let c = challenger(8);
        let token = c.issue(SUBJECT, NOW);
        let fields: Vec<&str> = token.split('.').collect();
        let flip = |s: &str| -> String {
            let mut b = s.as_bytes().to_vec();
            let last = b.len() - 1;
            b[last] = if b[last] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).unwrap()
        };
        for i in 1..fields.len() {
            let mut f: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
            f[i] = flip(&f[i]);
            let forged = f.join(".");
            // Solved at the claimed difficulty, so only the MAC can fail.
            let claimed: u8 = f[2].parse().unwrap();
            let p = proof(&forged, claimed.min(12));
            let got = c.verify(SUBJECT, &p, NOW);
            assert_eq!(got, Err(ProofError::Forged), "field {i}: {forged}");
        }
        // A longer lifetime or an easier difficulty than the one issued.
        let later = format!("v1.{}.{}", u64::MAX / 2, fields[2..].join("."));
        let easier = format!("v1.{}.1.{}.{}", fields[1], fields[3], fields[4]);
        for forged in [later, easier] {
            let p = proof(&forged, 8);
            assert_eq!(c.verify(SUBJECT, &p, NOW), Err(ProofError::Forged));
        }
    }

    #[test]
    fn expired() {
        let c = challenger(8);
        let token = c.issue(SUBJECT, NOW);
        let p = proof(&token, 8);
        assert_eq!(
            c.verify(SUBJECT, &p, NOW + 60_000),
            Err(ProofError::Expired)
        );
        assert_eq!(c.verify(SUBJECT, &p, NOW + 59_999), Ok(()));
    }

    #[test]
    fn raised_difficulty_makes_old_tokens_too_easy() {
        let c = challenger(8);
        let token = c.issue(SUBJECT, NOW);
        let p = proof(&token, 8);
        c.set_settings(settings(10));
        assert_eq!(c.difficulty(), 10);
        assert_eq!(
            c.verify(SUBJECT, &p, NOW),
            Err(ProofError::TooEasy {
                token: 8,
                required: 10
            })
        );
        // Lowering it again accepts the same proof; a harder token is still held to its own.
        c.set_settings(settings(8));
        assert_eq!(c.verify(SUBJECT, &p, NOW), Ok(()));
        c.set_settings(settings(12));
        let hard = c.issue(SUBJECT, NOW);
        c.set_settings(settings(4));
        assert_eq!(
            c.verify(SUBJECT, &wrong_proof(&hard, 12), NOW),
            Err(ProofError::NotSolved)
        );
        assert_eq!(c.verify(SUBJECT, &proof(&hard, 12), NOW), Ok(()));
    }

    #[test]
    fn wrong_solution_is_not_solved() {
        let c = challenger(16);
        let token = c.issue(SUBJECT, NOW);
        assert_eq!(
            c.verify(SUBJECT, &wrong_proof(&token, 16), NOW),
            Err(ProofError::NotSolved)
        );
        assert_eq!(c.remembered(), 0);
    }

    #[test]
    fn malformed() {
        let c = challenger(8);
        let token = c.issue(SUBJECT, NOW);
        let p = proof(&token, 8);
        let too_long = format!("{token}:{}", "1".repeat(MAX_PROOF_LEN - token.len()));
        assert_eq!(too_long.len(), MAX_PROOF_LEN + 1);
        let nonce_upper = {
            let f: Vec<&str> = token.split('.').collect();
            format!(
                "v1.{}.{}.{}.{}:0",
                f[1],
                f[2],
                "ABCDEF".repeat(6)[..32].to_owned(),
                f[4]
            )
        };
        for bad in [
            String::new(),
            token.clone(),
            format!("{token}:"),
            format!("{token}:1:2"),
            format!("{token}:é"),
            format!("{token}: 1"),
            format!("{token}:1\n"),
            too_long,
            "v2.1.8.00.00:1".to_owned(),
            "v1.1.8:1".to_owned(),
            p.replacen("v1.", "v1.+", 1),
            p.replacen(".8.", ".256.", 1),
            p.replacen(".8.", "..", 1),
            nonce_upper,
            format!("{}.00:1", token),
        ] {
            assert!(
                matches!(c.verify(SUBJECT, &bad, NOW), Err(ProofError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(c.verify(SUBJECT, &p, NOW), Ok(()));
    }

    #[test]
    fn used_set_is_bounded_and_drops_expired_first() {
        let c = Challenger::with_capacity([7; 32], settings(4), 3);
        let old = c.issue(SUBJECT, NOW);
        let young = c.issue(SUBJECT, NOW + 30_000);
        let proofs = |token: &str, k: usize| -> Vec<String> {
            (0u64..)
                .map(|n| format!("{token}:{n}"))
                .filter(|p| {
                    let d: [u8; 32] = Sha256::digest(p.as_bytes()).into();
                    leading_zero_bits(&d) >= 4
                })
                .take(k)
                .collect()
        };
        let old_proofs = proofs(&old, 2);
        let young_proofs = proofs(&young, 3);
        for p in &old_proofs {
            assert_eq!(c.verify(SUBJECT, p, NOW), Ok(()));
        }
        assert_eq!(c.verify(SUBJECT, &young_proofs[0], NOW), Ok(()));
        assert_eq!(c.remembered(), 3);
        // Full, nothing expired: refused, not grown; a replay is still called a replay.
        assert_eq!(
            c.verify(SUBJECT, &young_proofs[1], NOW + 1),
            Err(ProofError::Busy)
        );
        assert_eq!(
            c.verify(SUBJECT, &old_proofs[0], NOW + 1),
            Err(ProofError::Replayed)
        );
        assert_eq!(c.remembered(), 3);
        // The old token's proofs expire and make room.
        let later = NOW + 60_000;
        assert_eq!(c.verify(SUBJECT, &young_proofs[1], later), Ok(()));
        assert_eq!(c.remembered(), 2);
        assert_eq!(c.verify(SUBJECT, &young_proofs[2], later), Ok(()));
        assert_eq!(c.remembered(), 3);
        assert_eq!(
            c.verify(SUBJECT, &young_proofs[0], later),
            Err(ProofError::Replayed)
        );
    }

    #[test]
    fn leading_zero_bits_known_values() {
        let mut h = [0u8; 32];
        assert_eq!(leading_zero_bits(&h), 256);
        h[0] = 0x80;
        assert_eq!(leading_zero_bits(&h), 0);
        h[0] = 0x01;
        assert_eq!(leading_zero_bits(&h), 7);
        h[0] = 0;
        h[1] = 0x0f;
        assert_eq!(leading_zero_bits(&h), 12);
        h[1] = 0;
        h[31] = 1;
        assert_eq!(leading_zero_bits(&h), 255);
        // SHA-256("abc") = ba7816bf...: the first bit is set.
        let abc: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(leading_zero_bits(&abc), 0);
    }

    #[test]
    fn solve_finds_the_first_solution() {
        let token = "v1.0.8.00000000000000000000000000000000.00";
        let s = solve(token, 8);
        let n: u64 = s.parse().unwrap();
        for m in 0..n {
            let d: [u8; 32] = Sha256::digest(format!("{token}:{m}").as_bytes()).into();
            assert!(leading_zero_bits(&d) < 8);
        }
        let d: [u8; 32] = Sha256::digest(format!("{token}:{s}").as_bytes()).into();
        assert!(leading_zero_bits(&d) >= 8);
    }

    #[test]
    fn settings_validation() {
        assert_eq!(ChallengeSettings::default().validate().ok(), Some(()));
        for d in [1, 32] {
            assert!(settings(d).validate().is_ok());
        }
        for d in [0, 33] {
            let e = settings(d).validate().unwrap_err().to_string();
            assert!(e.contains("detect.challenge.difficulty"), "{e}");
        }
        for ttl in [Duration::from_millis(999), Duration::from_secs(3601)] {
            let s = ChallengeSettings {
                difficulty: 20,
                token_ttl: ttl,
            };
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("detect.challenge.token_ttl"), "{e}");
        }
        let parsed: ChallengeSettings =
            toml::from_str("difficulty = 18\ntoken_ttl = \"2m\"").unwrap();
        assert_eq!(
            parsed,
            ChallengeSettings {
                difficulty: 18,
                token_ttl: Duration::from_secs(120)
            }
        );
    }

    #[test]
    fn challenger_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Challenger>();
    }
}
