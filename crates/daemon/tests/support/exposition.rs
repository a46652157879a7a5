//! A strict parser of the Prometheus text exposition format (0.0.4), for
//! tests that read `/metrics`: every line must parse, every sample must
//! belong to a family declared by `# TYPE` before it, no series may repeat,
//! and histograms must be whole (cumulative buckets ending in `+Inf`, equal
//! to `_count`). Anything else is an error naming the line.

use std::collections::BTreeMap;

/// Labels of one series, sorted by name.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket`, `x_sum`, … for histograms).
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed scrape: families by name.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub families: BTreeMap<String, Family>,
}

impl Scrape {
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape::default();
        let mut seen = std::collections::HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let rest = rest.trim_start();
                if let Some(help) = rest.strip_prefix("HELP ") {
                    let (name, text) = help.split_once(' ').unwrap_or((help, ""));
                    check_name(name).map_err(at)?;
                    let family = scrape.families.entry(name.to_string()).or_insert(Family {
                        name: name.to_string(),
                        kind: Kind::Untyped,
                        help: None,
                        samples: Vec::new(),
                    });
                    if family.help.is_some() {
                        return Err(at("second HELP for the family".into()));
                    }
                    family.help = Some(unescape_help(text));
                } else if let Some(ty) = rest.strip_prefix("TYPE ") {
                    let (name, kind) = ty
                        .split_once(' ')
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    check_name(name).map_err(at)?;
                    let kind = match kind.trim() {
                        "counter" => Kind::Counter,
                        "gauge" => Kind::Gauge,
                        "histogram" => Kind::Histogram,
                        "summary" => Kind::Summary,
                        "untyped" => Kind::Untyped,
                        other => return Err(at(format!("unknown type {other:?}"))),
                    };
                    let family = scrape.families.entry(name.to_string()).or_insert(Family {
                        name: name.to_string(),
                        kind,
                        help: None,
                        samples: Vec::new(),
                    });
                    if !family.samples.is_empty() {
                        return Err(at("TYPE after the family's samples".into()));
                    }
                    family.kind = kind;
                }
                // Other comments are allowed and ignored.
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family_name = family_of(&scrape, &sample.name)
                .ok_or_else(|| at("sample of a family without # TYPE".into()))?;
            let key = (sample.name.clone(), sample.labels.clone());
            if !seen.insert(key) {
                return Err(at("series repeated".into()));
            }
            scrape
                .families
                .get_mut(&family_name)
                .expect("family exists")
                .samples
                .push(sample);
        }
        for family in scrape.families.values() {
            if family.kind == Kind::Histogram {
                check_histogram(family)?;
            }
            if family.kind == Kind::Counter && !family.name.ends_with("_total") {
                return Err(format!("counter {} does not end in _total", family.name));
            }
        }
        Ok(scrape)
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// The value of the one series of `name` whose labels include `labels`;
    /// panics when there is not exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matches: Vec<&Sample> = self.samples(name, labels);
        assert_eq!(
            matches.len(),
            1,
            "expected exactly one series {name}{labels:?}, found {matches:?}"
        );
        matches[0].value
    }

    /// The sum over the series of `name` whose labels include `labels`
    /// (0 when there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).iter().map(|s| s.value).sum()
    }

    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        let Some(family) = family_of(self, name).and_then(|f| self.families.get(&f)) else {
            return Vec::new();
        };
        family
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }
}

/// The declared family a sample name belongs to (a histogram's `_bucket`,
/// `_sum` and `_count` belong to the histogram).
fn family_of(scrape: &Scrape, sample: &str) -> Option<String> {
    if scrape.families.contains_key(sample) {
        return Some(sample.to_string());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && let Some(f) = scrape.families.get(base)
            && matches!(f.kind, Kind::Histogram | Kind::Summary)
        {
            return Some(base.to_string());
        }
    }
    None
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn unescape_help(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\\\", "\\")
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().ok_or("no value")?)?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `name="value",...}`; returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("label without =")?;
        let name = &s[..eq];
        check_name(name)?;
        if name.contains(':') || name.starts_with("__") {
            return Err(format!("reserved or invalid label name {name:?}"));
        }
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in a label value")),
                },
                Some((_, '\n')) | None => return Err("unterminated label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name:?} twice"));
        }
        s = &s[end + 1..];
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}")),
    }
}

/// Buckets cumulative per label set, ending in `+Inf` equal to `_count`,
/// with a `_sum`.
fn check_histogram(f: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<Labels, f64> = BTreeMap::new();
    let mut sums: BTreeMap<Labels, f64> = BTreeMap::new();
    for s in &f.samples {
        let mut labels = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{}: bucket without le", f.name))?;
            series
                .entry(labels)
                .or_default()
                .push((parse_value(&le)?, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(labels, s.value);
        } else if s.name.ends_with("_sum") {
            sums.insert(labels, s.value);
        } else {
            return Err(format!("{}: stray sample {}", f.name, s.name));
        }
    }
    for (labels, buckets) in &series {
        let mut previous = (f64::NEG_INFINITY, 0.0);
        for &(le, n) in buckets {
            if le <= previous.0 || n < previous.1 {
                return Err(format!(
                    "{}{labels:?}: buckets not increasing at le={le}",
                    f.name
                ));
            }
            previous = (le, n);
        }
        if previous.0 != f64::INFINITY {
            return Err(format!("{}{labels:?}: no +Inf bucket", f.name));
        }
        if counts.get(labels) != Some(&previous.1) {
            return Err(format!(
                "{}{labels:?}: +Inf bucket {} differs from _count {:?}",
                f.name,
                previous.1,
                counts.get(labels)
            ));
        }
        if !sums.contains_key(labels) {
            return Err(format!("{}{labels:?}: no _sum", f.name));
        }
    }
    if series.len() != counts.len() {
        return Err(format!("{}: _count without buckets", f.name));
    }
    Ok(())
}

/// `GET {base}/metrics`, parsed strictly.
pub async fn scrape(http: &reqwest::Client, base: &str) -> Scrape {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    Scrape::parse(&text).unwrap_or_else(|e| panic!("{base}/metrics: {e}"))
}
