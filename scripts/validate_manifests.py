"""Validates manifests/ (called by scripts/validate-manifests, which sets up its packages).

1. `kubectl kustomize manifests/` builds, and manifests/rendered/zmesh.yaml holds the same
   objects (compared as parsed YAML, so kustomize versions that order or format differently
   still agree).
2. Every built-in object is valid against the Kubernetes OpenAPI schema of KUBE_VERSION,
   strictly (an unknown field is an error), with kubernetes-validate.
3. The AuthorizationPolicy CRD is structural (the rules the API server checks that a JSON
   schema validator does not: a type on every node, no `properties` beside
   `additionalProperties`, no defaults) and serves v1 and v1beta1, storing v1beta1.
4. Every custom resource is valid against its CRD's schema with jsonschema, strictly: the
   AuthorizationPolicy examples (manifests/examples/, and the golden inputs of the controller's
   tests, some of which must be refused) against each served version of our CRD; the
   GatewayClass against the upstream fields written out below (the Gateway API CRD files are
   not in any package registry this project can use).

5. The objects the controller creates for a waypoint Gateway (generated into
   controller/tests/golden/waypoint/objects.yaml by controller/tests/waypoint_objects.rs) are
   valid built-in objects, strictly, as in 2.

Prints one line per check and exits non-zero on the first class of failure found.
"""

import copy
import glob
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBE_VERSION = "1.37.0"
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MANIFESTS = os.path.join(ROOT, "manifests")
RENDERED = os.path.join(MANIFESTS, "rendered", "zmesh.yaml")
CRD_NAME = "authorizationpolicies.security.istio.io"
# Istio's other security CRD zmesh installs (checked the same way, no golden inputs).
OTHER_CRDS = ["requestauthentications.security.istio.io"]

# Golden inputs the CRD must refuse, by (file, policy name): what the translation tolerates
# from a YAML directory but the API server refuses, as with Istio's CRD: an action in lower
# case (the schema enumerates ALLOW, DENY, AUDIT, CUSTOM), and fields outside the schema
# (refused by strict field validation, else pruned).
MUST_REFUSE = {
    ("audit_custom.in.yaml", "lowercase"),
    ("unknown_fields.in.yaml", "allow-typo-in-source"),
    ("unknown_fields.in.yaml", "deny-future-field"),
    ("unknown_fields.in.yaml", "allow-unknown-top-level"),
}

# GatewayClass (gateway.networking.k8s.io/v1), the fields of upstream's CRD
# (config/crd/standard/gateway.networking.k8s.io_gatewayclasses.yaml) with their limits.
GATEWAY_CLASS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "GatewayClass"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["controllerName"],
            "additionalProperties": False,
            "properties": {
                "controllerName": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 253,
                    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$",
                },
                "description": {"type": "string", "maxLength": 64},
                "parametersRef": {
                    "type": "object",
                    "required": ["group", "kind", "name"],
                    "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string", "maxLength": 253},
                        "kind": {"type": "string", "minLength": 1, "maxLength": 63},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
                    },
                },
            },
        },
    },
}


class Failed(Exception):
    pass


def ok(msg):
    print(f"ok    {msg}", flush=True)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ident(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name")
    return f"{doc.get('kind')} {ns + '/' if ns else ''}{name}"


def check_kustomize():
    try:
        out = subprocess.run(
            ["kubectl", "kustomize", MANIFESTS],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except FileNotFoundError:
        raise Failed("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    except subprocess.CalledProcessError as e:
        raise Failed(f"kubectl kustomize manifests/ failed:\n{e.stderr}")
    built = [d for d in yaml.safe_load_all(out) if d is not None]
    ok(f"kubectl kustomize manifests/ builds ({len(built)} objects)")
    rendered = load_all(RENDERED)
    key = lambda d: (d.get("apiVersion"), d.get("kind"), ident(d))
    if sorted(map(yaml.safe_dump, built)) != sorted(map(yaml.safe_dump, rendered)):
        built_keys = {key(d) for d in built}
        rendered_keys = {key(d) for d in rendered}
        missing = sorted(built_keys - rendered_keys)
        extra = sorted(rendered_keys - built_keys)
        raise Failed(
            "manifests/rendered/zmesh.yaml is not what `kubectl kustomize manifests/` builds "
            f"(objects only in the build: {missing}; only in the file: {extra}; otherwise a "
            "field differs): regenerate it with scripts/render-manifests"
        )
    ok("manifests/rendered/zmesh.yaml equals the kustomize build")
    return built


def check_builtin(docs, crds):
    custom = []
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        if any(c["spec"]["group"] == group and c["spec"]["names"]["kind"] == doc["kind"] for c in crds) or group.endswith("gateway.networking.k8s.io"):
            custom.append(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise Failed(f"{ident(doc)}: {doc['apiVersion']} is neither built into Kubernetes {KUBE_VERSION} nor one of our CRDs")
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            raise Failed(f"{ident(doc)} is invalid for Kubernetes {KUBE_VERSION} at {path or '.'}: {e.message}")
    ok(f"{len(docs) - len(custom)} built-in objects valid against Kubernetes {KUBE_VERSION} (strict)")
    return custom


def structural_problems(schema, path):
    """The structural-schema rules a JSON Schema validator does not enforce."""
    problems = []
    open_ = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    if "type" not in schema and not open_:
        problems.append(f"{path}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    for key in ("default", "nullable", "$ref", "definitions"):
        if key in schema:
            problems.append(f"{path}: has {key}")
    for name, sub in (schema.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}{{}}")
    return problems


def check_crd(crds, CRD_NAME=CRD_NAME):  # noqa: N803 (the checked CRD's name)
    crd = next((c for c in crds if c["metadata"]["name"] == CRD_NAME), None)
    if crd is None:
        raise Failed(f"the CRD {CRD_NAME} is not in manifests/")
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    stored = [n for n, v in versions.items() if v["storage"]]
    if sorted(versions) != ["v1", "v1beta1"] or stored != ["v1beta1"] or not all(v["served"] for v in versions.values()):
        raise Failed(f"{CRD_NAME} must serve v1 and v1beta1 and store v1beta1 (as Istio's does); it has {versions.keys()}, stored {stored}")
    for name, v in versions.items():
        problems = structural_problems(v["schema"]["openAPIV3Schema"], f"{name}")
        if problems:
            raise Failed(f"{CRD_NAME} is not a structural schema: " + "; ".join(problems))
    ok(f"{CRD_NAME}: structural, serves v1 and v1beta1, stores v1beta1")
    return {n: v["schema"]["openAPIV3Schema"] for n, v in versions.items()}


def strict(schema):
    """The schema as the API server applies it with strict field validation: unknown fields
    are errors, except under x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
            for sub in s["properties"].values():
                walk(sub)
        if isinstance(s.get("items"), dict):
            walk(s["items"])
        if isinstance(s.get("additionalProperties"), dict):
            walk(s["additionalProperties"])

    walk(schema)
    # apiVersion, kind and metadata are the API server's own; the CRD schema leaves them out.
    for field in ("apiVersion", "kind"):
        schema["properties"][field] = {"type": "string"}
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_policy(doc, schemas):
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    if group != "security.istio.io" or version not in schemas:
        return f"apiVersion {doc.get('apiVersion')} is not served"
    errors = sorted(jsonschema.Draft4Validator(strict(schemas[version])).iter_errors(doc), key=str)
    if errors:
        e = errors[0]
        return f"{'/'.join(str(p) for p in e.absolute_path) or '.'}: {e.message}"
    return None


def check_policies(schemas):
    files = sorted(glob.glob(os.path.join(MANIFESTS, "examples", "*.yaml")))
    golden = sorted(glob.glob(os.path.join(ROOT, "controller", "tests", "golden", "authz", "*.in.yaml")))
    accepted = refused = 0
    for path in files + golden:
        for doc in load_all(path):
            if doc.get("kind") != "AuthorizationPolicy":
                continue
            problem = validate_policy(doc, schemas)
            where = f"{os.path.relpath(path, ROOT)}: {ident(doc)}"
            expected_refusal = (os.path.basename(path), doc["metadata"]["name"]) in MUST_REFUSE and path in golden
            if problem and not expected_refusal:
                raise Failed(f"{where} is invalid against the CRD: {problem}")
            if expected_refusal and not problem:
                raise Failed(f"{where} has fields outside the schema, yet the CRD accepts it")
            accepted += problem is None
            refused += problem is not None
    if refused != len(MUST_REFUSE):
        raise Failed(f"expected {len(MUST_REFUSE)} golden policies to be refused, {refused} were")
    ok(f"{accepted} example AuthorizationPolicies valid against the CRD (strict); {refused} refused as expected (unknown fields, a lower-case action)")


def check_gateway_classes(custom):
    classes = [d for d in custom if d["kind"] == "GatewayClass"]
    if not classes:
        raise Failed("no GatewayClass in manifests/ (istio-waypoint is expected)")
    for doc in classes:
        try:
            jsonschema.Draft7Validator(GATEWAY_CLASS_SCHEMA).validate(doc)
        except jsonschema.ValidationError as e:
            raise Failed(f"{ident(doc)} is invalid: {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}")
    ok(f"{len(classes)} GatewayClass valid against upstream's fields (strict)")
    others = [ident(d) for d in custom if d["kind"] not in ("GatewayClass", "AuthorizationPolicy")]
    if others:
        raise Failed(f"no schema to validate these custom resources against: {others}")


def check_waypoint_objects():
    path = os.path.join(ROOT, "controller", "tests", "golden", "waypoint", "objects.yaml")
    docs = [d for d in load_all(path) if d]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            raise Failed(f"the controller's waypoint {ident(doc)} is invalid for Kubernetes {KUBE_VERSION} at {where or '.'}: {e.message} (controller/src/deploy/objects.rs)")
    if sorted(d["kind"] for d in docs) != ["Deployment", "Service", "ServiceAccount"]:
        raise Failed(f"{path}: expected a ServiceAccount, a Deployment and a Service")
    ok(f"{len(docs)} objects the controller creates for a waypoint valid against Kubernetes {KUBE_VERSION} (strict)")


def main():
    try:
        docs = check_kustomize()
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        custom = check_builtin(docs, crds)
        schemas = check_crd(crds)
        for name in OTHER_CRDS:
            check_crd(crds, name)
        check_policies(schemas)
        check_gateway_classes(custom)
        check_waypoint_objects()
    except Failed as e:
        sys.stdout.flush()
        print(f"FAIL  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
