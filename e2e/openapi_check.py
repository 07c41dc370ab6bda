"""Checks API responses recorded by e2e/tests/api.rs against docs/api.yaml: each
response's status is documented for its operation, its JSON body matches the documented
schema, and every documented operation was exercised at least once.

usage: /usr/bin/python3 e2e/openapi_check.py docs/api.yaml samples.json [--some]
--some: the samples cover some operations only (no check that every one was exercised)
samples.json: [{"method", "path" (the template, e.g. /agents/{id}), "status", "body"}]
"""
import copy
import json
import sys

import jsonschema
import yaml


def json_schema(node):
    """OpenAPI 3.0 schema -> JSON Schema: `nullable: true` becomes a null alternative."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def main():
    spec = json_schema(yaml.safe_load(open(sys.argv[1])))
    samples = json.load(open(sys.argv[2]))
    resolver = jsonschema.RefResolver.from_schema(spec)
    problems = []
    seen = set()
    for sample in samples:
        method, path, status = sample["method"].lower(), sample["path"], str(sample["status"])
        where = f"{sample['method']} {path} -> {status}"
        operation = spec["paths"].get(path, {}).get(method)
        if operation is None:
            problems.append(f"{where}: no such operation in the document")
            continue
        seen.add((path, method))
        response = operation["responses"].get(status)
        if response is None:
            problems.append(f"{where}: status not documented")
            continue
        if "$ref" in response:
            response = resolver.resolve(response["$ref"])[1]
        content = response.get("content", {})
        if "application/json" in content:
            try:
                body = json.loads(sample["body"])
            except ValueError:
                problems.append(f"{where}: body is not JSON: {sample['body'][:200]}")
                continue
            schema = content["application/json"]["schema"]
            validator = jsonschema.Draft7Validator(copy.deepcopy(schema), resolver=resolver)
            for error in validator.iter_errors(body):
                path_in_body = "/".join(str(p) for p in error.absolute_path)
                problems.append(f"{where}: at /{path_in_body}: {error.message}")
    every = "--some" not in sys.argv[3:]
    for path, operations in spec["paths"].items():
        for method in operations:
            if every and (path, method) not in seen:
                problems.append(f"{method.upper()} {path}: documented but never exercised")
    for problem in problems:
        print(problem)
    print(f"{len(samples)} responses checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
