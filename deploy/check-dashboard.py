#!/usr/bin/env python3
"""Evaluates every query of the Grafana dashboard against a Prometheus that scrapes a
running cluster, with the variables as Grafana fills them ($job the scrape job,
$instance and $service "all", $__rate_interval four scrape intervals), and fails when
a query returns no data. deploy/test.sh runs it against the compose cluster.

    check-dashboard.py PROMETHEUS_URL DASHBOARD_JSON JOB RATE_INTERVAL
"""
import json
import sys
import urllib.parse
import urllib.request

prometheus, dashboard_path, job, rate_interval = sys.argv[1:5]
variables = {
    "$__rate_interval": rate_interval,
    "$__interval": rate_interval,
    "$job": job,
    "$instance": ".*",
    "$service": ".*",
}


def fill(expr):
    # Longest names first: $__rate_interval before $__interval.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", variables[name]).replace(name, variables[name])
    return expr


def query(expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.load(reply)
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


dashboard = json.load(open(dashboard_path))
panels, queries, empty = 0, 0, []
for panel in dashboard["panels"]:
    if panel.get("type") == "row":
        continue
    panels += 1
    for target in panel.get("targets", []):
        expr = target.get("expr")
        if not expr:
            continue
        queries += 1
        if not query(fill(expr)):
            empty.append(f"{panel.get('title')}: {fill(expr)}")
for variable in dashboard.get("templating", {}).get("list", []):
    definition = variable.get("definition", "")
    if definition.startswith("label_values("):
        # label_values(METRIC_SELECTOR, LABEL): the series must exist.
        selector = definition[len("label_values("):].rsplit(",", 1)[0]
        queries += 1
        if not query(fill(selector)):
            empty.append(f"variable {variable['name']}: {fill(selector)}")
if empty:
    print(f"{len(empty)} of {queries} dashboard queries returned no data:", file=sys.stderr)
    for line in empty:
        print(f"  {line}", file=sys.stderr)
    sys.exit(1)
print(f"every one of the dashboard's {queries} queries ({panels} panels and its variables) returned data")
