"""``mla-registry run`` and ``report`` through click."""

import textwrap


def write(tmp_path, base, variants: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: cli
        output_dir: {tmp_path / 'runs'}
        base_model: {base}
        data: {{test: "builtin:real?source=jfk"}}
        decoding: {{max_new_tokens: 4}}
        variants:
        """) + textwrap.indent(textwrap.dedent(variants), "  "))
    return str(path)


def test_check_then_run_then_report(invoke, tiny_base, tmp_path):
    path = write(tmp_path, tiny_base, "- name: base\n- name: gqa\n  attention: {decoder.*: 'gqa:kv_heads=2'}\n")
    checked = invoke("run", path, "--check")
    assert checked.exit_code == 0 and "OK (2 variants" in checked.output
    result = invoke("run", path, "--quiet", "--format", "github")
    assert result.exit_code == 0, result.output
    assert "| gqa " in result.output and "self=gqa(kv_heads=2)" in result.output
    assert (tmp_path / "runs" / "cli" / "report.md").exists()
    again = invoke("report", tmp_path / "runs" / "cli", "--format", "csv")
    assert again.exit_code == 0 and again.output.startswith("variant,attention,params")


def test_run_check_reports_every_problem_in_one_go(invoke, tiny_base, tmp_path):
    path = write(tmp_path, tiny_base, "- name: a\n  attention: {decoder.*: 'mla:rank=999'}\n- name: a\n")
    result = invoke("run", path, "--check")
    assert result.exit_code == 1 and "2 problem(s)" in result.output
    assert "allowed values: 1..64" in result.output and "duplicate variant name 'a'" in result.output
    assert invoke("run", tmp_path / "missing.yaml").exit_code != 0
    assert invoke("run", path, "--format", "html").exit_code == 2
