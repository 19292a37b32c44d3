//! `gangplank install`: prints what `kubectl apply -f -` installs.
//!
//! - `crds`: Gangplank's CustomResourceDefinitions (OnboardingPolicy, JoinToken,
//!   WorkloadBinding, and the operator's OnboardingPlane), as `deploy/crds/` ships them;
//! - `operator`: the operator's install manifest (namespace, every CRD, RBAC, the operator's
//!   Deployment), as `deploy/operator.yaml` ships it.

use std::process::ExitCode;

use anyhow::Context;

/// Arguments of `gangplank install`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print Gangplank's CRDs as YAML (pipe into `kubectl apply -f -`).
    Crds,
    /// Print the operator's install manifest (pipe into `kubectl apply -f -`; the same as
    /// deploy/operator.yaml with the defaults).
    #[command(
        after_help = "Example:\n  gangplank install operator --image registry.example/gangplank-operator:0.1.0 | kubectl apply -f -"
    )]
    Operator {
        /// The operator's image (default: the locally built gangplank-operator:<version>;
        /// push it to your registry and name it here).
        #[arg(long, default_value_t = gangplank_operator::manifest::default_image())]
        image: String,
        /// The operator's namespace (its leader Lease lives there).
        #[arg(short = 'n', long, default_value = "gangplank-system", value_parser = namespace)]
        namespace: String,
        /// Operator replicas (one leads, the others stand by).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..=10))]
        replicas: i32,
    },
}

/// A namespace name: a DNS-1123 label.
fn namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a namespace is at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit".into())
    }
}

/// Runs `gangplank install`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Crds => {
            let mut yaml = gangplank_registry::crds::yaml().context("rendering Gangplank's CRDs")?;
            let plane = gangplank_operator::crd_yaml().context("rendering the OnboardingPlane CRD")?;
            yaml.push_str("---\n");
            yaml.push_str(&plane);
            gangplank_stdout::print(yaml)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator {
            image,
            namespace,
            replicas,
        } => {
            let settings = gangplank_operator::manifest::Settings {
                namespace,
                image,
                replicas,
            };
            let yaml =
                gangplank_operator::manifest::yaml(&settings).context("rendering the operator's manifest")?;
            gangplank_stdout::print(yaml)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
