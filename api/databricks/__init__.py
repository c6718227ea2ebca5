"""What the databricks-genai SDK talks to: its GraphQL API, the workspace REST calls around it, and MLflow."""
