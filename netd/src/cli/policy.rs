//! `netd policy apply|delete|list`: the policies in etcd at
//! `<prefix>/policies/<name>`.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};

use super::EtcdArgs;
use crate::{
    control::{
        config::FileConfig,
        registry::{Access, Registry},
    },
    policy::{
        Policy,
        spec::{Direction, validate_name},
    },
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy (JSON file, `-` for stdin) and store it under its
    /// name, replacing a policy of the same name.
    Apply(ApplyArgs),
    /// Remove a stored policy.
    Delete(DeleteArgs),
    /// List the stored policies.
    List(ListArgs),
}

/// etcd options as `netd run` takes them: flags over `NETD_*` variables over
/// the config file.
#[derive(Debug, Args)]
pub struct PolicyEtcdArgs {
    /// TOML file of `netd run` (its etcd options are used; flags win).
    #[arg(long, env = "NETD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Policy file, or `-` for standard input.
    pub file: PathBuf,
    #[command(flatten)]
    pub etcd: PolicyEtcdArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: String,
    #[command(flatten)]
    pub etcd: PolicyEtcdArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the stored documents as a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub etcd: PolicyEtcdArgs,
}

pub async fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Apply(args) => apply(args).await,
        PolicyCommand::Delete(args) => delete(args).await,
        PolicyCommand::List(args) => list(args).await,
    }
}

impl PolicyEtcdArgs {
    fn access(&self) -> Result<Access> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                FileConfig::parse(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut etcd = self.etcd.clone();
        etcd.etcd_endpoints = etcd.etcd_endpoints.or(file.etcd_endpoints);
        etcd.etcd_prefix = etcd.etcd_prefix.or(file.etcd_prefix);
        etcd.access()
    }
}

fn read_document(file: &Path) -> Result<Vec<u8>> {
    if file == Path::new("-") {
        let mut out = Vec::new();
        std::io::stdin()
            .read_to_end(&mut out)
            .context("reading the policy from standard input")?;
        return Ok(out);
    }
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

async fn apply(args: ApplyArgs) -> Result<()> {
    let source = if args.file == Path::new("-") {
        "standard input".to_string()
    } else {
        args.file.display().to_string()
    };
    // Validate before touching etcd: a refused policy writes nothing.
    let policy = Policy::parse(&read_document(&args.file)?)
        .with_context(|| format!("{source}: policy refused"))?;
    let json = serde_json::to_string(&policy).context("serializing the policy")?;
    let mut registry = Registry::connect(&args.etcd.access()?).await?;
    let key = registry.policy_key(&policy.name);
    let previous = registry
        .put_policy(&policy.name, &json)
        .await
        .with_context(|| format!("writing {key}"))?;
    let verb = match previous {
        None => "created",
        Some(old) if Policy::parse(&old).is_ok_and(|old| old == policy) => "unchanged",
        Some(_) => "replaced",
    };
    println!("{verb} policy {} at {key}", policy.name);
    Ok(())
}

async fn delete(args: DeleteArgs) -> Result<()> {
    validate_name(&args.name)?;
    let mut registry = Registry::connect(&args.etcd.access()?).await?;
    let key = registry.policy_key(&args.name);
    if !registry
        .delete_policy(&args.name)
        .await
        .with_context(|| format!("deleting {key}"))?
    {
        bail!("no policy named {} (nothing at {key})", args.name);
    }
    println!("deleted policy {} at {key}", args.name);
    Ok(())
}

async fn list(args: ListArgs) -> Result<()> {
    let mut registry = Registry::connect(&args.etcd.access()?).await?;
    let stored = registry
        .list_policies()
        .await
        .with_context(|| format!("listing {}", registry.policies_prefix()))?;
    if args.json {
        // The documents as stored; one that is not JSON as a string.
        let docs: Vec<serde_json::Value> = stored
            .iter()
            .map(|(_, raw)| {
                serde_json::from_slice(raw)
                    .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned().into())
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = stored
        .iter()
        .map(|(name, raw)| match Policy::parse_named(raw, name) {
            Ok(p) => row(&p),
            Err(e) => [
                name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("invalid (ignored): {e}"),
            ],
        })
        .collect();
    print!("{}", table(&rows));
    Ok(())
}

const HEADER: [&str; 6] = ["NAME", "NETWORK", "SELECTOR", "TYPES", "INGRESS", "EGRESS"];

fn row(p: &Policy) -> [String; 6] {
    let selector = if p.selector.is_empty() {
        "{}".to_string()
    } else {
        p.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let types = p
        .directions()
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(",");
    let count = |dir: Direction, present: bool| {
        if present {
            format!("{} rules", p.rules(dir).len())
        } else {
            "-".into()
        }
    };
    [
        p.name.clone(),
        p.network.clone(),
        selector,
        types,
        count(Direction::Ingress, p.ingress.is_some()),
        count(Direction::Egress, p.egress.is_some()),
    ]
}

/// Columns padded to their widest cell; the last one is not padded.
fn table(rows: &[[String; 6]]) -> String {
    let mut widths = HEADER.map(str::len);
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 < cells.len() {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(HEADER);
    for r in rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn parses_policy_commands() {
        let cli = Cli::try_parse_from([
            "netd",
            "policy",
            "apply",
            "-",
            "--etcd-endpoints",
            "http://a:2379",
            "--etcd-prefix",
            "/p",
        ])
        .unwrap();
        let Command::Policy(PolicyCommand::Apply(args)) = cli.command else {
            panic!("not policy apply")
        };
        assert_eq!(args.file, PathBuf::from("-"));
        let access = args.etcd.access().unwrap();
        assert_eq!(access.endpoints, ["http://a:2379"]);
        assert_eq!(access.prefix, "/p");
        assert!(Cli::try_parse_from(["netd", "policy", "delete"]).is_err());
        assert!(Cli::try_parse_from(["netd", "policy", "list", "--json"]).is_ok());
    }

    #[test]
    fn config_file_under_flags() {
        let dir = std::env::temp_dir().join(format!("netd-policy-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("netd.toml");
        std::fs::write(
            &file,
            "etcd-endpoints = [\"http://198.18.0.254:2379\"]\netcd-prefix = \"/from/file\"\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut all = vec!["netd", "policy", "list", "--config", file.to_str().unwrap()];
            all.extend(extra);
            let Command::Policy(PolicyCommand::List(list)) =
                Cli::try_parse_from(all).unwrap().command
            else {
                panic!("not policy list")
            };
            list.etcd.access().unwrap()
        };
        let from_file = args(&[]);
        assert_eq!(from_file.endpoints, ["http://198.18.0.254:2379"]);
        assert_eq!(from_file.prefix, "/from/file");
        let from_flag = args(&["--etcd-prefix", "/flag"]);
        assert_eq!(from_flag.prefix, "/flag");
        assert_eq!(from_flag.endpoints, ["http://198.18.0.254:2379"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn list_rows() {
        let p = Policy::parse(
            br#"{"name":"web","selector":{"app":"web","tier":"a"},"ingress":[{},{}],"egress":[]}"#,
        )
        .unwrap();
        assert_eq!(
            row(&p),
            [
                "web",
                "default",
                "app=web,tier=a",
                "Ingress,Egress",
                "2 rules",
                "0 rules"
            ]
            .map(String::from)
        );
        let text = table(&[row(&p)]);
        assert!(text.starts_with("NAME  NETWORK  SELECTOR"), "{text}");
        assert_eq!(text.lines().count(), 2);
    }
}
