"""`qckpt push PATH REPO_ID`: verify a converted folder, then upload it shard by shard in one commit."""
from __future__ import annotations

import json

import click


@click.command("push")
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(path, repo_id, private, revision, message, token, as_json):
    """Upload a converted folder; re-running after an interruption sends only what the Hub lacks."""
    from ..publish import push

    result = push(path, repo_id, private=private, revision=revision, message=message, token=token)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}"
                   f"{' commit ' + result.commit if result.commit else ''}"
                   f"{' (' + result.commit_url + ')' if result.commit_url else ''}")
