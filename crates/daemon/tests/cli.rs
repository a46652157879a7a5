//! The command line as a user runs it: exit codes and messages.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_convstore");

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CONVSTORE_CONFIG")
        .envs(envs.iter().copied())
        .output()
        .expect("run convstore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), contents).expect("write config");
    file
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let file = config_file("[queue]\ncapacity = 123\n");
    let path = file.path().to_str().unwrap();
    let (code, stdout, stderr) = run(
        &["check-config", "--config", path],
        &[("CONVSTORE_BATCH__MAX_SIZE", "7")],
    );
    assert_eq!(code, 0, "{stderr}");
    let parsed: toml::Table = toml::from_str(&stdout).expect("output is TOML");
    assert_eq!(parsed["queue"]["capacity"].as_integer(), Some(123));
    assert_eq!(
        parsed["batch"]["max_size"].as_integer(),
        Some(7),
        "environment overrides the file"
    );
    assert_eq!(
        parsed["server"]["http_addr"].as_str(),
        Some("127.0.0.1:7070")
    );
}

#[test]
fn check_config_names_the_wrong_key_and_exits_2() {
    /// (config file contents, environment overrides, the key the message must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[queue]\ncapacty = 5\n", &[], "capacty"),
        ("[batch]\nmax_size = 0\n", &[], "max_size"),
        (
            "[server]\nhttp_addr = \"localhost:80\"\n",
            &[],
            "server.http_addr",
        ),
        ("", &[("CONVSTORE_QUEUE__WHEN_FULL", "drop")], "when_full"),
        ("", &[("CONVSTORE_PIPELINE__WORKERS", "-1")], "workers"),
        (
            "[[embedding.backends]]\nname = \"a\"\nurl = \"not a url\"\n",
            &[],
            "embedding.backends[0].url",
        ),
    ];
    for (contents, envs, key) in cases {
        let file = config_file(contents);
        let (code, _stdout, stderr) = run(
            &["check-config", "--config", file.path().to_str().unwrap()],
            envs,
        );
        assert_eq!(code, 2, "{contents} {envs:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{contents} {envs:?}: message should name `{key}`: {stderr}"
        );
    }
    let (code, _, stderr) = run(
        &["check-config", "--config", "/nonexistent/convstore.toml"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/convstore.toml"), "{stderr}");
}

#[test]
fn help_lists_the_user_commands_and_no_test_tool() {
    let (code, stdout, stderr) = run(&["--help"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let commands: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for wanted in [
        "serve",
        "migrate",
        "check-config",
        "reload",
        "enqueue",
        "status",
        "search",
        "bench",
    ] {
        assert!(
            commands.contains(&wanted),
            "{wanted} missing from {commands:?}"
        );
    }
    // The stand-in is a test tool (tools/standin), not part of the daemon.
    assert!(
        !commands.iter().any(|c| c.contains("standin")),
        "{commands:?}"
    );
    let (code, _, stderr) = run(&["standin"], &[]);
    assert_eq!(code, 2, "`convstore standin` is not a command: {stderr}");
}

/// `auth.socket_owner` and `auth.socket_group` must exist on this system:
/// check-config used to accept any name, and serve found out only once the
/// socket was bound, after starting everything else.
#[test]
fn check_config_and_serve_refuse_a_socket_owner_or_group_that_does_not_exist() {
    for (contents, key, name) in [
        (
            "[auth]\nsocket_owner = \"no-such-user-convstore\"\n",
            "auth.socket_owner",
            "no-such-user-convstore",
        ),
        (
            "[auth]\nsocket_group = \"no-such-group-convstore\"\n",
            "auth.socket_group",
            "no-such-group-convstore",
        ),
    ] {
        let file = config_file(contents);
        let path = file.path().to_str().unwrap();
        let (code, _stdout, stderr) = run(&["check-config", "--config", path], &[]);
        assert_eq!(code, 2, "{contents}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(name),
            "{contents}: should name `{key}` and `{name}`: {stderr}"
        );
        // serve stops at the configuration, before any listener or database.
        let state = tempfile::tempdir().unwrap();
        let (code, _stdout, stderr) = run(
            &["serve", "--config", path],
            &[
                ("CONVSTORE_STATE_DIR", state.path().to_str().unwrap()),
                ("CONVSTORE_SERVER__HTTP_ADDR", "127.0.0.1:0"),
                ("CONVSTORE_SERVER__UNIX_SOCKET", ""),
            ],
        );
        assert_ne!(code, 0, "serve started with {contents}");
        assert!(
            stderr.contains(key) && stderr.contains(name),
            "serve with {contents}: should name `{key}`: {stderr}"
        );
    }
    // Names and ids that exist pass.
    let file = config_file("[auth]\nsocket_owner = \"root\"\nsocket_group = \"0\"\n");
    let (code, _stdout, stderr) = run(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
}
