//! `aiguard top`: a live terminal view of what the node decides, refreshed each second from one
//! `top` admin request: drops per second at the NIC by reason (with sparklines), the most hit
//! bans, and gateway requests per second by tier.
//!
//! Rates are the difference of two snapshots over the daemon's own clock between them. The
//! terminal is put back (raw mode off, main screen, cursor shown) on every way out: `q`, Esc or
//! Ctrl-C, an error, a panic.
use std::{
    collections::{BTreeMap, VecDeque},
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table},
};

use super::{fmt_time, truncate};
use crate::admin::{Reply, Request, TopSnapshot, client};

/// Time between two snapshots.
const REFRESH: Duration = Duration::from_secs(1);
/// Rates kept per drop reason for the sparklines (wider than any terminal needs).
const HISTORY: usize = 240;

/// Runs the view until the operator quits. The first snapshot is taken before the terminal is
/// touched, so that an unreachable daemon is reported on a normal screen.
pub fn run(socket: &Path) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "`aiguard top` draws on a terminal and stdout is not one; for scripts use `aiguard status --json`"
        );
    }
    let first = fetch(socket)?;
    let snapshots = spawn_fetcher(socket.to_owned());
    let _restore = RawScreen::enter()?;
    let mut terminal =
        Terminal::new(CrosstermBackend::new(std::io::stdout())).context("setting up the screen")?;
    let mut view = View::new(socket.to_owned());
    view.update(Ok(first));
    loop {
        while let Ok(next) = snapshots.try_recv() {
            view.update(next);
        }
        terminal
            .draw(|f| view.draw(f))
            .context("drawing the screen")?;
        // Short polls: a snapshot that arrives is drawn within this, a key handled at once.
        if event::poll(Duration::from_millis(100)).context("reading the terminal")? {
            match event::read().context("reading the terminal")? {
                Event::Key(k) if k.kind != KeyEventKind::Release && quits(k.code, k.modifiers) => {
                    break;
                }
                // The next draw lays the panes out for the new size.
                Event::Resize(..) => terminal.autoresize().context("resizing")?,
                _ => {}
            }
        }
    }
    Ok(())
}

fn quits(code: KeyCode, modifiers: KeyModifiers) -> bool {
    match code {
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
        KeyCode::Char('c') => modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// One snapshot, or why there is none (in words for the screen).
fn fetch(socket: &Path) -> anyhow::Result<TopSnapshot> {
    match client::call(socket, &Request::Top)? {
        Reply::Top(s) => Ok(*s),
        Reply::Error { message, .. } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// Asks for a snapshot each [`REFRESH`] on a thread of its own, so that a daemon slow to answer
/// (a large ban batch holds its lock) never stops the keys from being read.
fn spawn_fetcher(socket: PathBuf) -> mpsc::Receiver<Result<TopSnapshot, String>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut next = Instant::now() + REFRESH;
        loop {
            thread::sleep(next.saturating_duration_since(Instant::now()));
            next += REFRESH;
            let got = fetch(&socket).map_err(|e| {
                // The client's own message names the socket and what to do.
                e.chain()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ")
            });
            if tx.send(got).is_err() {
                return;
            }
        }
    });
    rx
}

/// Raw mode and the alternate screen while it lives; restores the terminal when dropped and
/// before a panic message is printed.
struct RawScreen;

impl RawScreen {
    fn enter() -> anyhow::Result<Self> {
        terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        // From here on, every way out restores the terminal.
        let guard = Self;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)
            .context("switching to the alternate screen")?;
        Ok(guard)
    }
}

impl Drop for RawScreen {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}

/// What the screen shows: the last snapshot and the rates between the last two.
struct View {
    socket: PathBuf,
    last: Option<TopSnapshot>,
    /// Drops per second by reason, oldest first.
    drop_rates: BTreeMap<String, VecDeque<u64>>,
    /// Hits per second of each listed ban, by range.
    ban_rates: BTreeMap<String, f64>,
    /// (allowed, limited) per second, by tier.
    tier_rates: BTreeMap<String, (f64, f64)>,
    /// Why the last refresh failed, if it did (the numbers shown are then older).
    error: Option<String>,
}

impl View {
    fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            last: None,
            drop_rates: BTreeMap::new(),
            ban_rates: BTreeMap::new(),
            tier_rates: BTreeMap::new(),
            error: None,
        }
    }

    fn update(&mut self, next: Result<TopSnapshot, String>) {
        let next = match next {
            Ok(s) => s,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        self.error = None;
        if let Some(prev) = &self.last {
            // The daemon's clock: the time between two answers, not between two asks.
            let secs = (next.now_ms.saturating_sub(prev.now_ms) as f64 / 1000.0).max(0.001);
            let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
            for (reason, total) in &next.drops {
                let before = prev.drops.get(reason).copied().unwrap_or(*total);
                let history = self.drop_rates.entry(reason.clone()).or_default();
                history.push_back(rate(*total, before).round() as u64);
                if history.len() > HISTORY {
                    history.pop_front();
                }
            }
            self.ban_rates = next
                .top_bans
                .iter()
                .map(|b| {
                    let before = prev
                        .top_bans
                        .iter()
                        .find(|p| p.range == b.range)
                        .map_or(b.hits, |p| p.hits);
                    (b.range.clone(), rate(b.hits, before))
                })
                .collect();
            self.tier_rates = next
                .tiers
                .iter()
                .map(|t| {
                    let (allowed, limited) = prev
                        .tiers
                        .iter()
                        .find(|p| p.tier == t.tier)
                        .map_or((t.allowed(), t.limited()), |p| (p.allowed(), p.limited()));
                    (
                        t.tier.clone(),
                        (rate(t.allowed(), allowed), rate(t.limited(), limited)),
                    )
                })
                .collect();
        } else {
            for reason in next.drops.keys() {
                self.drop_rates.entry(reason.clone()).or_default();
            }
        }
        self.last = Some(next);
    }

    fn draw(&self, f: &mut Frame) {
        let Some(s) = &self.last else { return };
        let drops_height = 2 + s.drops.len().max(1) as u16;
        let [header, drops, lower, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(drops_height),
            Constraint::Min(4),
            Constraint::Length(1),
        ])
        .areas(f.area());
        f.render_widget(Paragraph::new(header_line(s)), header);
        self.draw_drops(f, s, drops);
        let [bans, tiers] =
            Layout::horizontal([Constraint::Percentage(52), Constraint::Percentage(48)])
                .areas(lower);
        self.draw_bans(f, s, bans);
        self.draw_tiers(f, s, tiers);
        let footer_line = match &self.error {
            Some(e) => Line::from(Span::styled(
                format!(
                    "refresh failed ({}), showing older numbers: {e}",
                    self.socket.display()
                ),
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            )),
            None => Line::from(vec![
                Span::styled("q", Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(" quit   refresh 1s   totals since the daemon started"),
            ]),
        };
        f.render_widget(Paragraph::new(footer_line), footer);
    }

    fn draw_drops(&self, f: &mut Frame, s: &TopSnapshot, area: Rect) {
        let on = if s.interfaces.is_empty() {
            "no interface attached".to_owned()
        } else {
            s.interfaces.join(", ")
        };
        let block = Block::default()
            .borders(Borders::ALL)
            .title(format!(" Drops/s at the NIC ({on}) "));
        let inner = block.inner(area);
        f.render_widget(block, area);
        let rows = Layout::vertical(vec![Constraint::Length(1); s.drops.len().max(1)]).split(inner);
        for ((reason, total), row) in s.drops.iter().zip(rows.iter()) {
            let history = self.drop_rates.get(reason);
            let now = history.and_then(|h| h.back()).copied().unwrap_or(0);
            let [label, spark] =
                Layout::horizontal([Constraint::Length(34), Constraint::Min(1)]).areas(*row);
            f.render_widget(
                Paragraph::new(format!(
                    "{reason:<7}{:>7}/s  total {:>9}",
                    now,
                    short(*total)
                )),
                label,
            );
            let width = spark.width as usize;
            let data: Vec<u64> = history
                .map(|h| {
                    h.iter()
                        .skip(h.len().saturating_sub(width))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            f.render_widget(
                Sparkline::default()
                    .data(data)
                    .style(Style::default().fg(Color::Red)),
                spark,
            );
        }
    }

    fn draw_bans(&self, f: &mut Frame, s: &TopSnapshot, area: Rect) {
        let block = Block::default()
            .borders(Borders::ALL)
            .title(format!(" Top banned ranges ({} bans) ", s.bans));
        if s.top_bans.is_empty() {
            f.render_widget(Paragraph::new("no bans").block(block), area);
            return;
        }
        let rows = s.top_bans.iter().map(|b| {
            let rate = self.ban_rates.get(&b.range).copied().unwrap_or(0.0);
            let range = if b.shadow {
                format!("{} (shadow)", b.range)
            } else {
                b.range.clone()
            };
            Row::new(vec![
                Cell::from(truncate(&range, 22)),
                Cell::from(short(b.hits)),
                Cell::from(format!("{rate:.0}")),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Min(12),
                Constraint::Length(7),
                Constraint::Length(6),
            ],
        )
        .header(bold_row(["RANGE", "HITS", "HITS/S"]))
        .block(block);
        f.render_widget(table, area);
    }

    fn draw_tiers(&self, f: &mut Frame, s: &TopSnapshot, area: Rect) {
        let block = Block::default()
            .borders(Borders::ALL)
            .title(" Gateway requests/s by tier ");
        if !s.gateway {
            f.render_widget(Paragraph::new("gateway off").block(block), area);
            return;
        }
        let rows = s.tiers.iter().map(|t| {
            let (allowed, limited) = self.tier_rates.get(&t.tier).copied().unwrap_or((0.0, 0.0));
            Row::new(vec![
                Cell::from(truncate(&t.tier, 10)),
                Cell::from(format!("{allowed:.1}")),
                Cell::from(format!("{limited:.1}")),
                Cell::from(short(t.allowed())),
                Cell::from(short(t.limited())),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Min(6),
                Constraint::Length(5),
                Constraint::Length(5),
                Constraint::Length(6),
                Constraint::Length(6),
            ],
        )
        .header(bold_row(["TIER", "OK/S", "LIM/S", "OK", "LIM"]))
        .block(block);
        f.render_widget(table, area);
    }
}

fn bold_row<const N: usize>(titles: [&'static str; N]) -> Row<'static> {
    Row::new(titles.map(Cell::from)).style(Style::default().add_modifier(Modifier::BOLD))
}

fn header_line(s: &TopSnapshot) -> Line<'static> {
    let store = match &s.store {
        None => Span::raw("store: embedded"),
        Some(st) if st.up => Span::styled(
            format!("store: {} up", st.backend),
            Style::default().fg(Color::Green),
        ),
        Some(st) => Span::styled(
            format!("store: {} DOWN ({} errors)", st.backend, st.errors),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    };
    Line::from(vec![
        Span::styled("aiguard top", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  node {}  up {}  {}  ",
            truncate(&s.node, 16),
            uptime(s.uptime_secs),
            fmt_time(s.now_ms)
        )),
        store,
    ])
}

/// `3d4h`, `2h5m`, `4m10s`, `12s`: two units at most, to fit the header.
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// A count in at most 6 characters: `999999`, `1.2M`, `34.5G`.
fn short(n: u64) -> String {
    match n {
        0..1_000_000 => n.to_string(),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{TierRequests, TopBan};
    use ratatui::{Terminal, backend::TestBackend};

    fn snapshot(now_ms: u64, banned: u64, hits: u64, allowed: u64, limited: u64) -> TopSnapshot {
        TopSnapshot {
            node: "edge-1".into(),
            version: "0.1.0".into(),
            uptime_secs: 3725,
            now_ms,
            interfaces: vec!["eth0".into()],
            passed: 100,
            drops: [("banned".to_owned(), banned), ("rate".to_owned(), 0)].into(),
            bans: 1,
            top_bans: vec![TopBan {
                range: "203.0.113.0/24".into(),
                hits,
                reason: "stuffing".into(),
                shadow: false,
            }],
            gateway: true,
            tiers: vec![TierRequests {
                tier: "free".into(),
                outcomes: [
                    ("allowed".to_owned(), allowed),
                    ("rate_limited".to_owned(), limited),
                ]
                .into(),
            }],
            store: None,
        }
    }

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(80, 24)).expect("a test terminal");
        t.draw(|f| view.draw(f)).expect("draws");
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn rates_are_deltas_over_the_daemons_clock() {
        let mut v = View::new("/run/aiguard/admin.sock".into());
        v.update(Ok(snapshot(10_000, 100, 100, 5, 1)));
        v.update(Ok(snapshot(12_000, 300, 300, 9, 5)));
        assert_eq!(v.drop_rates["banned"].back(), Some(&100));
        assert_eq!(v.drop_rates["rate"].back(), Some(&0));
        assert_eq!(v.ban_rates["203.0.113.0/24"], 100.0);
        assert_eq!(v.tier_rates["free"], (2.0, 2.0));
        let s = screen(&v);
        for text in [
            "aiguard top  node edge-1  up 1h2m",
            "store: embedded",
            "Drops/s at the NIC (eth0)",
            "banned     100/s  total       300",
            "Top banned ranges (1 bans)",
            "203.0.113.0/24",
            "Gateway requests/s by tier",
            "free",
        ] {
            assert!(s.contains(text), "{text:?} missing from\n{s}");
        }
    }

    #[test]
    fn a_failed_refresh_keeps_the_numbers_and_says_why() {
        let mut v = View::new("/run/aiguard/admin.sock".into());
        v.update(Ok(snapshot(10_000, 1, 1, 1, 1)));
        v.update(Err("cannot reach the aiguard daemon".into()));
        let s = screen(&v);
        assert!(
            s.contains("refresh failed (/run/aiguard/admin.sock)"),
            "{s}"
        );
        assert!(s.contains("203.0.113.0/24"), "{s}");
    }

    #[test]
    fn counts_and_uptimes_fit_their_columns() {
        assert_eq!(short(999_999), "999999");
        assert_eq!(short(1_250_000), "1.2M");
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(3725), "1h2m");
        assert_eq!(uptime(90_000), "1d1h");
    }

    #[test]
    fn quit_keys() {
        assert!(quits(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(quits(KeyCode::Esc, KeyModifiers::NONE));
        assert!(quits(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!quits(KeyCode::Char('c'), KeyModifiers::NONE));
    }
}
