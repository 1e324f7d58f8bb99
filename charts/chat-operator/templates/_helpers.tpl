{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "chat-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: the release name, prefixed with the chart name unless it
already contains it. */}}
{{- define "chat-operator.fullname" -}}
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

{{- define "chat-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chat-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "chat-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chat-operator
{{- end }}

{{- define "chat-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chat-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ClusterRole of a cluster-wide install has this fixed name (the operator's API-server tests
bind a ClusterRole of this name, made from files/operator-rules.yaml). */}}
{{- define "chat-operator.clusterRoleName" -}}
chat-operator
{{- end }}

{{/* The watched namespaces, comma-separated and sorted (watchNamespaces plus the older single
watchNamespace); empty for a cluster-wide install. */}}
{{- define "chat-operator.watchNamespaces" -}}
{{- $namespaces := concat (.Values.watchNamespaces | default list) (list .Values.watchNamespace) | compact | uniq | sortAlpha -}}
{{- join "," $namespaces -}}
{{- end }}

{{/* Name of the leader-election Lease; fixed in the operator binary (src/main.rs). */}}
{{- define "chat-operator.leaseName" -}}
chat-operator-leader
{{- end }}

{{- define "chat-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fails rendering on value combinations the schema cannot express. */}}
{{- define "chat-operator.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true: two operators must never reconcile at once" }}
{{- end }}
{{- end }}
