"""The tables. Importing this package registers every model with `db`."""
from models.agent import Agent, Personality, PersonalityPrompt, Project, Prompt
from models.chat import ChatMessage, ChatThread, MessageStatus
from models.common import DEFAULT_ENDPOINT, ENDPOINTS, Kind, Role, Status, iso, new_id, utcnow
from models.llm import Llm
from models.token import ApiToken, PublisherSession
from models.usage import UsageBucket

__all__ = [
    "DEFAULT_ENDPOINT", "ENDPOINTS", "Agent", "ApiToken", "ChatMessage", "ChatThread", "Kind", "Llm", "MessageStatus",
    "Personality", "PersonalityPrompt", "Project", "Prompt", "PublisherSession", "Role",
    "Status", "UsageBucket", "iso", "new_id", "utcnow",
]
