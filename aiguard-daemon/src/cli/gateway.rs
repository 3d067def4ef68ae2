//! The gateway's commands: `keys`, `quota`, `usage`, `reload`.
use std::path::Path;

use clap::{Args, Subcommand, ValueEnum};

use super::{ask, fmt_time, unexpected};
use crate::{
    admin::{QuotaReport, Reply, Request},
    keys::KeyRecord,
    usage::UsageRow,
};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for a tenant; it is printed once and never again (only its hash is kept).
    Add {
        #[arg(long)]
        tenant: String,
        /// Tier of the key [default: gateway.default_tier].
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id: from now on it gets 401.
    Revoke { id: String },
    /// Suspend a key: it gets 403 until the time is up or it is resumed.
    Suspend {
        id: String,
        /// How long, e.g. 30m, 1h, 7d.
        #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "1h")]
        duration: std::time::Duration,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a key's suspension.
    Resume { id: String },
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[arg(long)]
    pub tenant: Option<String>,
    /// Month (UTC), YYYY-MM [default: this month].
    #[arg(long, value_name = "YYYY-MM")]
    pub month: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn keys(socket: &Path, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Add { tenant, tier, json } => {
            match ask(socket, &Request::KeysAdd { tenant, tier })? {
                Reply::KeyCreated { key, secret } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": key.id, "key": secret, "tenant": key.tenant, "tier": key.tier
                            })
                        );
                    } else {
                        println!("{secret}");
                        eprintln!(
                            "key {} for tenant {} (tier {}): store it now, it is not shown again",
                            key.id, key.tenant, key.tier
                        );
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        KeysCommand::List { tenant, json } => match ask(socket, &Request::KeysList { tenant })? {
            Reply::Keys { keys } => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&keys)?);
                } else {
                    print_keys(&keys);
                }
                Ok(())
            }
            other => unexpected(other),
        },
        KeysCommand::Revoke { id } => match ask(socket, &Request::KeysRevoke { id })? {
            Reply::KeyRevoked { key } => {
                println!("revoked {} (tenant {})", key.id, key.tenant);
                Ok(())
            }
            other => unexpected(other),
        },
        KeysCommand::Suspend {
            id,
            duration,
            reason,
        } => {
            let for_ms = duration.as_millis() as u64;
            match ask(socket, &Request::KeysSuspend { id, for_ms, reason })? {
                Reply::KeySuspended { key } => {
                    println!(
                        "suspended {} (tenant {}) until {}",
                        key.id,
                        key.tenant,
                        key.suspended_until_ms.map_or_else(String::new, fmt_time)
                    );
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        KeysCommand::Resume { id } => match ask(socket, &Request::KeysResume { id })? {
            Reply::KeyResumed { key } => {
                println!("resumed {} (tenant {})", key.id, key.tenant);
                Ok(())
            }
            other => unexpected(other),
        },
    }
}

fn print_keys(keys: &[KeyRecord]) {
    if keys.is_empty() {
        println!("no keys (create one with `aiguard keys add --tenant T`)");
        return;
    }
    println!(
        "{:<17} {:<20} {:<12} {:<9} {:<20} STATE",
        "ID", "TENANT", "TIER", "STARTS", "CREATED"
    );
    for k in keys {
        let now = crate::bans::now_ms();
        let state = match (k.revoked_ms, k.suspended_until_ms) {
            (Some(ms), _) => format!("revoked {}", fmt_time(ms)),
            (None, Some(until)) if until > now => format!(
                "suspended until {} ({})",
                fmt_time(until),
                k.suspended_reason.as_deref().unwrap_or("no reason given")
            ),
            _ => "active".into(),
        };
        println!(
            "{:<17} {:<20} {:<12} {:<9} {:<20} {state}",
            k.id,
            k.tenant,
            k.tier,
            format!("{}…", k.hint),
            fmt_time(k.created_ms)
        );
    }
}

pub fn quota(socket: &Path, tenant: String, json: bool) -> anyhow::Result<()> {
    match ask(socket, &Request::Quota { tenant })? {
        Reply::Quota(q) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&q)?);
            } else {
                print_quota(&q);
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

fn print_quota(q: &QuotaReport) {
    println!("tenant {} ({} UTC)", q.tenant, q.month);
    println!("used:      {:>14} tokens", q.used);
    if q.reserved > 0 {
        println!("reserved:  {:>14} tokens (requests in flight)", q.reserved);
    }
    match (q.limit, q.remaining) {
        (Some(limit), Some(rem)) => {
            println!("remaining: {rem:>14} tokens of {limit}");
            println!(
                "resets in {} ({})",
                humantime::format_duration(std::time::Duration::from_secs(
                    q.resets_in_secs / 60 * 60
                )),
                match q.enforcement {
                    crate::tiers::QuotaEnforcement::Hard => "hard quota: streams end at it",
                    crate::tiers::QuotaEnforcement::Soft => "soft quota: checked at admission",
                }
            );
        }
        _ => println!("no monthly quota"),
    }
}

pub fn usage(socket: &Path, args: UsageArgs) -> anyhow::Result<()> {
    let request = Request::Usage {
        month: args.month,
        tenant: args.tenant,
    };
    match ask(socket, &request)? {
        Reply::Usage { month, rows } => {
            match args.format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"month": month, "rows": rows})
                    )?
                ),
                Format::Csv => print!("{}", csv(&rows)),
                Format::Table => print_usage(&month, &rows),
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

/// RFC 4180 CSV (fields quoted when they hold a comma, quote or newline).
pub fn csv(rows: &[UsageRow]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    }
    let mut out =
        String::from("day,tenant,key,model,requests,prompt_tokens,completion_tokens,cost\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{:.6}\n",
            r.day,
            field(&r.tenant),
            field(&r.key),
            field(&r.model),
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost
        ));
    }
    out
}

fn print_usage(month: &str, rows: &[UsageRow]) {
    if rows.is_empty() {
        println!("no usage in {month}");
        return;
    }
    println!(
        "{:<10} {:<16} {:<17} {:<20} {:>9} {:>12} {:>12} {:>12}",
        "DAY", "TENANT", "KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "COST"
    );
    let (mut req, mut p, mut c, mut cost) = (0, 0, 0, 0.0);
    for r in rows {
        println!(
            "{:<10} {:<16} {:<17} {:<20} {:>9} {:>12} {:>12} {:>12.6}",
            r.day,
            r.tenant,
            r.key,
            r.model,
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost
        );
        req += r.requests;
        p += r.prompt_tokens;
        c += r.completion_tokens;
        cost += r.cost;
    }
    println!(
        "{:<10} {:<16} {:<17} {:<20} {:>9} {:>12} {:>12} {:>12.6}",
        month, "total", "", "", req, p, c, cost
    );
}

pub fn reload(socket: &Path) -> anyhow::Result<()> {
    match ask(socket, &Request::Reload)? {
        Reply::Reloaded { needs_restart } => {
            println!("configuration reloaded");
            if !needs_restart.is_empty() {
                eprintln!(
                    "warning: these changed settings take effect only after a restart: {}",
                    needs_restart.join(", ")
                );
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it() {
        let rows = vec![UsageRow {
            day: "2026-12-03".into(),
            tenant: "acme".into(),
            key: "key_1".into(),
            model: "llama, \"70b\"".into(),
            requests: 2,
            prompt_tokens: 10,
            completion_tokens: 20,
            cost: 0.5,
        }];
        assert_eq!(
            csv(&rows),
            "day,tenant,key,model,requests,prompt_tokens,completion_tokens,cost\n2026-12-03,acme,key_1,\"llama, \"\"70b\"\"\",2,10,20,0.500000\n"
        );
    }
}
