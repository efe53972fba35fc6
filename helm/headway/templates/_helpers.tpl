{{/*
Names, labels and derived settings shared by every template, rbac.yaml included.
*/}}

{{- define "headway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; cluster-scoped objects carry it, so two releases never clash. */}}
{{- define "headway.fullname" -}}
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

{{- define "headway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "headway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "headway.labels" -}}
helm.sh/chart: {{ include "headway.chart" . }}
{{ include "headway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: headway
{{- end }}

{{/* Selects the operator's pods, active and standby alike (NetworkPolicy peers use it). */}}
{{- define "headway.operatorSelectorLabels" -}}
{{ include "headway.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "headway.serviceAccountName" -}}
{{- printf "%s-operator" (include "headway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "headway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "headway.placeholderPriorityClassName" -}}
{{- default (printf "%s-warm-placeholder" (include "headway.fullname" .)) .Values.placeholderPriorityClass.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "headway.peeringName" -}}
{{- default (include "headway.fullname" .) .Values.operator.peeringName }}
{{- end }}

{{- define "headway.redisName" -}}
{{- printf "%s-redis" (include "headway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Redis URL the operator renders into every contract document; empty: in-memory limits. */}}
{{- define "headway.redisURL" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:6379/0" (include "headway.redisName" .) .Release.Namespace }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* Namespaces whose pool pods the NetworkPolicy covers, as a JSON list. */}}
{{- define "headway.poolNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- $namespaces | uniq | toJson }}
{{- end }}

{{/*
Settings the chart checks across fields, where values.schema.json cannot name
the field clearly. Included by the operator Deployment, so a bad combination
fails every install, template and lint.
*/}}
{{- define "headway.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "redis.enabled and redis.url are exclusive: the chart's Redis is for trying Headway out; set one of them" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.passwordSecret.name .Values.redis.tlsSecret.name) }}
{{- fail "redis.passwordSecret and redis.tlsSecret describe an external Redis (redis.url); the chart's Redis (redis.enabled) has neither" }}
{{- end }}
{{- if and .Values.redis.tlsSecret.name (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tlsSecret needs a rediss:// redis.url" }}
{{- end }}
{{- if and .Values.redis.passwordSecret.name (not .Values.redis.url) }}
{{- fail "redis.passwordSecret needs redis.url" }}
{{- end }}
{{- end }}
