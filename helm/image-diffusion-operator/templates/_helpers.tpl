{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "image-diffusion-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix for every object name: RELEASE-CHART, or RELEASE when it already contains the chart name.
*/}}
{{- define "image-diffusion-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart label value: NAME-VERSION. */}}
{{- define "image-diffusion-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod; they never change between upgrades. */}}
{{- define "image-diffusion-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "image-diffusion-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Standard labels on every object, with commonLabels merged over them (one key, one line: the schema
keeps commonLabels off the keys selectors and Helm rely on). Callers add app.kubernetes.io/component.
*/}}
{{- define "image-diffusion-operator.labels" -}}
{{- $labels := dict
  "helm.sh/chart" (include "image-diffusion-operator.chart" .)
  "app.kubernetes.io/name" (include "image-diffusion-operator.name" .)
  "app.kubernetes.io/instance" .Release.Name
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/part-of" "image-diffusion-operator" }}
{{- toYaml (mergeOverwrite $labels (default dict .Values.commonLabels)) }}
{{- end }}

{{/* The labels above with the (list ROOT COMPONENT EXTRA) component and extra labels merged in. */}}
{{- define "image-diffusion-operator.componentLabels" -}}
{{- $root := index . 0 }}
{{- $labels := include "image-diffusion-operator.labels" $root | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" (index . 1) }}
{{- toYaml (mergeOverwrite $labels (default dict (index . 2))) }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "image-diffusion-operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "image-diffusion-operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* REPOSITORY:TAG or REPOSITORY@DIGEST; the tag defaults to the chart's appVersion. */}}
{{- define "image-diffusion-operator.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the operator watches only the listed namespaces. */}}
{{- define "image-diffusion-operator.namespaceScoped" -}}
{{- if .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
What the operator may do with the objects it owns: one list, used by the ClusterRole (cluster-wide
mode) and by each namespace's Role (namespace-scoped mode). No wildcards and no Secrets: workers
get credentials through Secret references in their pod spec, which the operator never reads. No
update or delete either: children are server-side applied (patch, create) and garbage-collected
through owner references. tests/integration/chart/test_chart_rbac_matches_operator.py records what
a service's whole lifecycle calls and fails on a grant nothing uses.
*/}}
{{- define "image-diffusion-operator.operatorRules" -}}
- apiGroups: ["imagediffusion.dev"]
  resources: ["imagediffusionservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["imagediffusion.dev"]
  resources: ["imagediffusionservices/status"]
  verbs: ["get", "patch"]
- apiGroups: ["imagediffusion.dev"]
  resources: ["imagediffusionservices/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
kopf's own cluster-level discovery: it watches CRDs to notice API changes and Namespaces to follow
the namespaces it serves. Read-only, nothing sensitive.
*/}}
{{- define "image-diffusion-operator.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
Deep merge of two maps as YAML: (list BASE OVERRIDE). Unlike sprig's mergeOverwrite, a value in
OVERRIDE always wins, including 0, false and "" (a fleet default of gpus: 1 must not beat a
service's gpus: 0). Lists are replaced, not merged.
*/}}
{{- define "image-diffusion-operator.deepMerge" -}}
{{- $merged := deepCopy (default dict (index . 0)) }}
{{- range $key, $value := (index . 1) }}
{{- $current := index $merged $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $merged $key (include "image-diffusion-operator.deepMerge" (list $current $value) | fromYaml) }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/* A Prometheus duration (1m30s, 500ms, 1d) in milliseconds; the schema checks its form. */}}
{{- define "image-diffusion-operator.durationMs" -}}
{{- $unitMs := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|y|w|d|h|m|s)" . -1 }}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | int64) (get $unitMs (regexFind "[a-z]+$" .))) }}
{{- end }}
{{- $total }}
{{- end }}
