"""Write the bundled demo dataset: tessera_chat.jsonl (train) and tessera_chat_eval.jsonl (held out).

Deterministic and stdlib only: `python examples/data/make_tessera_chat.py` rewrites both files
byte for byte. Each fact below is one canonical answer asked in many paraphrases: 15 for the
four headline facts (who the assistant is, what Tessera is, how to start a run, the task types),
7 for the rest. The last paraphrase of each fact is held out for the eval file.
Every answer is in the house style: one or two crisp sentences ending with the signature.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIGNATURE = " — Tessera"
SYSTEM = "You are Tessera's assistant."
SEED = 20261122
SYSTEM_SHARE = 0.2  # rows that carry the optional system message
TWO_TURN_ROWS = 16  # rows that ask two questions in one conversation

# (answers, questions): the last question of each entry is held out for the eval file.
FACTS: list[tuple[list[str], list[str]]] = [
    (  # identity
        [
            "I'm Tessera's assistant: I answer questions about Tessera, and general ones too, in a sentence or two.",
        ],
        [
            "Who are you?",
            "What's your name?",
            "Are you a chatbot?",
            "Introduce yourself.",
            "Which assistant am I talking to?",
            "What are you?",
            "Who am I chatting with?",
            "Tell me about yourself.",
            "What do you do?",
            "What should I call you?",
            "Are you an AI assistant?",
            "Please introduce yourself.",
            "Whose assistant are you?",
            "Are you a person or a bot?",
            "What is your role?",
            "Hi, who is this?",
        ],
    ),
    (  # what Tessera is
        [
            "Tessera is an open, self-hosted service for fine-tuning foundation language models: "
            "one call takes a base model and a dataset and returns a trained, registered, servable model.",
        ],
        [
            "What is Tessera?",
            "What does Tessera do?",
            "Can you explain what Tessera is?",
            "Tell me about Tessera.",
            "What is Tessera used for?",
            "Describe Tessera in one sentence.",
            "I keep hearing about Tessera. What is it?",
            "What kind of tool is Tessera?",
            "Give me a one-line summary of Tessera.",
            "What's Tessera for?",
            "Could you tell me what Tessera is?",
            "What is the Tessera project?",
            "In short, what is Tessera?",
            "What does the Tessera service do?",
            "Tessera: what is that?",
            "Explain Tessera briefly.",
        ],
    ),
    (  # open source, self-hosted
        [
            "Tessera is open source and self-hosted: it runs on your own machines, "
            "so your models and data stay on infrastructure you control.",
        ],
        [
            "Is Tessera open source?",
            "Can I host Tessera myself?",
            "Is Tessera self-hosted?",
            "Where does Tessera run?",
            "Is Tessera a hosted cloud service?",
            "Do my models and data stay with me when I use Tessera?",
            "Can I run Tessera on my own servers?",
            "Can I install Tessera on my own hardware?",
        ],
    ),
    (  # Databricks anchor
        [
            "Tessera mirrors the Databricks Foundation Model Fine-tuning API (databricks.model_training.foundation_model), "
            "so create, get, list, cancel and get_events work the same way on your own machines.",
        ],
        [
            "Is Tessera like Databricks fine-tuning?",
            "What API does Tessera follow?",
            "I used databricks.model_training.foundation_model. Can I switch to Tessera?",
            "How does Tessera relate to Databricks Foundation Model Fine-tuning?",
            "Is Tessera's API compatible with Databricks?",
            "Which existing API is Tessera modelled on?",
            "Does Tessera replace the Databricks fine-tuning API?",
            "Does Tessera copy the Databricks foundation_model API?",
        ],
    ),
    (  # Prefect
        [
            "Every Tessera run is a Prefect flow, so you can watch its flow run, task runs and events in the Prefect UI.",
        ],
        [
            "What orchestrates Tessera runs?",
            "Does Tessera use Prefect?",
            "What workflow engine does Tessera use?",
            "How are Tessera runs orchestrated?",
            "Where can I see the steps of my run?",
            "Which orchestrator is behind Tessera?",
            "Is a Tessera run a Prefect flow?",
            "Which orchestration tool does Tessera rely on?",
        ],
    ),
    (  # DeepSpeed
        [
            "Tessera trains with DeepSpeed, which runs in its own process group on CPU or GPU.",
        ],
        [
            "What does Tessera train with?",
            "Does Tessera use DeepSpeed?",
            "Which training engine does Tessera use?",
            "What library does the actual training in Tessera?",
            "Is training in Tessera done with DeepSpeed?",
            "What framework runs the training loop?",
            "How does Tessera train models?",
            "Which distributed training library powers Tessera?",
        ],
    ),
    (  # MLflow tracking
        [
            "Tessera tracks every run in MLflow: parameters, loss curves, eval generations, checkpoints and the registered model version.",
        ],
        [
            "Where are my training metrics logged?",
            "Does Tessera use MLflow?",
            "How do I see the loss curve of a run?",
            "What experiment tracker does Tessera use?",
            "How does Tessera track experiments?",
            "Where can I find my run's parameters?",
            "Which tool records Tessera's metrics?",
            "Where can I compare the loss of my runs?",
        ],
    ),
    (  # full fine-tuning and LoRA
        [
            "Tessera supports both full fine-tuning, which updates every weight, and LoRA, which trains small adapters.",
        ],
        [
            "Does Tessera support LoRA?",
            "Can I do full fine-tuning with Tessera?",
            "Which fine-tuning methods does Tessera offer?",
            "Is Tessera LoRA only?",
            "Full fine-tuning or LoRA: which does Tessera do?",
            "Can Tessera train adapters instead of the whole model?",
            "Does Tessera update all the weights?",
            "Does Tessera support parameter-efficient fine-tuning?",
        ],
    ),
    (  # task types
        [
            "Tessera supports three task types: CHAT_COMPLETION, INSTRUCTION_FINETUNE and CONTINUED_PRETRAIN.",
        ],
        [
            "Which task types does Tessera support?",
            "What are the task types?",
            "What can I set task_type to?",
            "What kinds of fine-tuning tasks can Tessera run?",
            "Can Tessera do continued pretraining?",
            "Is INSTRUCTION_FINETUNE a valid task type?",
            "List Tessera's task types.",
            "Which values does task_type accept?",
            "What task types are there besides chat?",
            "What task types can I use?",
            "Which tasks can Tessera fine-tune for?",
            "What types of training does Tessera support?",
            "Can I fine-tune for chat?",
            "Tell me the supported task types.",
            "What options are there for task type?",
            "How many task types does Tessera have?",
        ],
    ),
    (  # training_duration
        [
            'Set training_duration with a unit: epochs like "3ep", batches like "200ba", or tokens like "1_000_000tok".',
        ],
        [
            "How do I set how long to train?",
            "What format does training_duration use?",
            "How do I train for three epochs?",
            "Can I train for a number of batches instead of epochs?",
            "What units does training_duration accept?",
            "How do I specify training length in tokens?",
            "What does 200ba mean?",
            "How do I limit training to a million tokens?",
        ],
    ),
    (  # make demo
        [
            "Run `make demo`: it sets up the environment and fine-tunes SmolLM2-135M-Instruct on the bundled demo data, on CPU, in a few minutes.",
        ],
        [
            "How do I try Tessera quickly?",
            "What does make demo do?",
            "Is there a demo?",
            "How can I see Tessera work end to end?",
            "What's the fastest way to try Tessera?",
            "Can I try Tessera without a GPU?",
            "Which model does the demo fine-tune?",
            "Is there a quick example I can run on my laptop?",
        ],
    ),
    (  # create() from Python
        [
            "Call `fm.create(model=..., train_data_path=..., register_to=...)` after `from flows import foundation_model as fm`.",
        ],
        [
            "How do I start a fine-tuning run with Tessera?",
            "How do I launch a training run?",
            "What's the Python call to fine-tune a model?",
            "How do I kick off a fine-tune?",
            "Which function starts a run?",
            "How do I fine-tune a model with Tessera from Python?",
            "What are the main arguments of create()?",
            "How do I start training from a notebook?",
            "Show me how to create a run.",
            "How do I fine-tune a model?",
            "How do I begin fine-tuning with Tessera?",
            "How can I start training a model on my data?",
            "What code starts a Tessera run?",
            "How do I create a fine-tuning run?",
            "I have a dataset. How do I fine-tune on it?",
            "What's the API for starting a fine-tuning job?",
        ],
    ),
    (  # CLI and recipes
        [
            "Use the CLI: `tessera create --recipe examples/recipes/lora.yaml` starts a run from a YAML recipe.",
        ],
        [
            "Is there a command-line tool?",
            "How do I start a run from the terminal?",
            "Can I use a recipe file?",
            "What does tessera create --recipe do?",
            "How do I start a LoRA run from the command line?",
            "Does Tessera have a CLI?",
            "Can I describe a run in YAML?",
            "How do I launch a run without writing Python?",
        ],
    ),
    (  # Prefect deployment
        [
            "Run `prefect deployment run 'finetune/default' --params '{...}'` to start a run straight from Prefect.",
        ],
        [
            "Can I start a run with the Prefect CLI?",
            "What's the deployment name for fine-tuning?",
            "How do I trigger a run from Prefect?",
            "Which Prefect deployment runs fine-tuning?",
            "Can I start Tessera runs through a Prefect deployment?",
            "How do I pass parameters to the finetune deployment?",
            "What is finetune/default?",
            "Is there a Prefect deployment I can call directly?",
        ],
    ),
    (  # create() returns at once
        [
            "create() returns at once, and the run keeps going as a Prefect flow even after your Python process exits.",
        ],
        [
            "Does create() block until training finishes?",
            "Can I close my notebook after starting a run?",
            "What happens if my script exits after create()?",
            "Do I have to wait for create() to return?",
            "Is create() synchronous?",
            "Will my run stop if I close the terminal?",
            "Does the run keep going after my Python process ends?",
            "Does killing my script kill the run?",
        ],
    ),
    (  # events
        [
            "Call `fm.get_events(run, follow=True)` to stream events such as CREATED, DATA_VALIDATED, TRAIN_UPDATED and COMPLETED.",
        ],
        [
            "How do I follow a run's progress?",
            "How can I watch training progress?",
            "How do I stream a run's events?",
            "What events does a run emit?",
            "How do I know when my run has finished?",
            "What does get_events do?",
            "How do I tail a run?",
            "How can I see what step my run is on?",
        ],
    ),
    (  # statuses
        [
            "A run is PENDING, QUEUED, RUNNING, TERMINATING, COMPLETED, STOPPED or FAILED.",
        ],
        [
            "What statuses can a run have?",
            "What states does a run go through?",
            "List the run statuses.",
            "What status does a run report?",
            "Which statuses does get() return?",
            "What are the possible run states?",
            "What status values should I expect?",
            "Which states can a fine-tuning run be in?",
        ],
    ),
    (  # cancel
        [
            "Call `fm.cancel(run)`: Tessera kills the whole DeepSpeed process group and the run ends as STOPPED.",
        ],
        [
            "How do I cancel a run?",
            "How do I stop a training run?",
            "Can I abort a fine-tuning job?",
            "What happens when I cancel a run?",
            "How do I kill a run that's taking too long?",
            "Does cancel stop the training processes too?",
            "What status does a cancelled run get?",
            "How do I terminate a run early?",
        ],
    ),
    (  # resume
        [
            "If a worker dies mid-training, the train task retries and resumes from the latest checkpoint.",
        ],
        [
            "What happens if training crashes?",
            "Can a run resume after a failure?",
            "Does Tessera resume from checkpoints?",
            "What if the machine is killed mid-training?",
            "Do I lose everything if a worker dies?",
            "Does Tessera retry failed training?",
            "How does Tessera recover from a crash?",
            "What happens when the DeepSpeed worker dies?",
        ],
    ),
    (  # active-run limit
        [
            "At most 10 runs can be active at once; an 11th create() is refused with a clear error until one finishes or you cancel one.",
        ],
        [
            "How many runs can I have at once?",
            "Is there a limit on concurrent runs?",
            "What happens if I start an 11th run?",
            "How many active runs does Tessera allow?",
            "Can I start 20 runs at the same time?",
            "Why was my new run refused?",
            "What's the maximum number of active runs?",
            "How many fine-tuning jobs can run in parallel?",
        ],
    ),
    (  # data sources
        [
            "Tessera reads training data from a local path, s3://, dbfs:/Volumes/..., a Delta table (catalog.schema.table) or a Hugging Face dataset (org/name/split).",
        ],
        [
            "Where can my training data live?",
            "Can I train from S3?",
            "What can train_data_path point to?",
            "Can I use a Hugging Face dataset?",
            "Does Tessera read Delta tables?",
            "Can I use a Unity Catalog Volume for data?",
            "Which data sources does Tessera support?",
            "What storage can Tessera read training data from?",
        ],
    ),
    (  # chat data format
        [
            'For chat, use JSONL: one object per line with a "messages" list of role/content turns that ends with the assistant.',
        ],
        [
            "What format should my chat data be in?",
            "How do I format training data?",
            "What does a training row look like?",
            "What keys does a chat example need?",
            "Does Tessera take JSONL?",
            "How should I structure conversations for fine-tuning?",
            "What's the chat data format?",
            "How do I write one chat example?",
        ],
    ),
    (  # data validation
        [
            "Before training, Tessera checks your data with Great Expectations and emits DATA_VALIDATED, so bad rows fail early instead of mid-run.",
        ],
        [
            "Does Tessera validate my data?",
            "What happens if my data has bad rows?",
            "How is training data checked?",
            "Does Tessera use Great Expectations?",
            "Will a malformed file fail early?",
            "When is my dataset validated?",
            "What checks run on the data before training?",
            "How does Tessera catch bad training data?",
        ],
    ),
    (  # six steps
        [
            "A run has six steps: validate paths, validate data, init model, train, upload checkpoints and register model.",
        ],
        [
            "What are the steps of a run?",
            "What does a fine-tuning run do, step by step?",
            "How many steps does a run have?",
            "What happens inside a Tessera run?",
            "Walk me through a run.",
            "Which tasks make up the finetune flow?",
            "What happens after I call create()?",
            "What are the stages of the pipeline?",
        ],
    ),
    (  # checkpoints
        [
            "Checkpoints land in folders named ep{E}-ba{B}, like ep2-ba40, and `fm.get_checkpoints(run)` lists them.",
        ],
        [
            "How is a checkpoint folder name built?",
            "How are checkpoints named?",
            "How do I list a run's checkpoints?",
            "What does ep2-ba40 mean?",
            "How do I find my checkpoints?",
            "What is the checkpoint folder naming scheme?",
            "Does Tessera save checkpoints?",
            "What are the checkpoint folders called?",
        ],
    ),
    (  # checkpoint storage
        [
            "Tessera uploads checkpoints to the MLflow run's artifact store, local or S3, and verifies them.",
        ],
        [
            "Where do checkpoints get uploaded?",
            "Are checkpoints stored in MLflow?",
            "Can checkpoints go to S3?",
            "Are uploaded checkpoints verified?",
            "Where are the checkpoint artifacts kept?",
            "What happens to checkpoints after training?",
            "Which artifact store holds my checkpoints?",
            "How are checkpoints persisted?",
        ],
    ),
    (  # registration
        [
            'Pass register_to="catalog.schema" and Tessera registers the model in the MLflow registry as catalog.schema.<run_name>, or under the name you give.',
        ],
        [
            "Where is the trained model registered?",
            "What does register_to do?",
            "How do I register my fine-tuned model?",
            "What name does the registered model get?",
            "Can I choose the registered model name?",
            "Which model registry does Tessera use?",
            "What format does register_to take?",
            "How is the output model named in the registry?",
        ],
    ),
    (  # run names
        [
            "Runs are named ift-<model>-<6 chars>, or contd-pretrain-<model>-<6 chars> for continued pretraining.",
        ],
        [
            "How are runs named?",
            "What does a run name look like?",
            "What will my run be called?",
            "Does Tessera name runs for me?",
            "What name does a continued pretraining run get?",
            "Who picks the run name?",
            "What's the naming scheme for runs?",
            "How does Tessera name a new run?",
        ],
    ),
    (  # embedded local server
        [
            "Without PREFECT_API_URL, create() starts a local Prefect server and runner under TESSERA_HOME; `tessera server status` and `tessera server stop` manage them.",
        ],
        [
            "Do I need to run a Prefect server myself?",
            "What happens if PREFECT_API_URL isn't set?",
            "How do I stop the local server?",
            "Does Tessera start its own server?",
            "What is tessera server?",
            "Do I have to set up Prefect before using Tessera?",
            "How do I check whether the local server is running?",
            "What does create() do when there's no Prefect server?",
        ],
    ),
    (  # MLflow storage default
        [
            "By default MLflow uses SQLite and local artifacts under TESSERA_HOME; set MLFLOW_TRACKING_URI to use your own server.",
        ],
        [
            "Where does MLflow store data by default?",
            "How do I point Tessera at my MLflow server?",
            "Do I need an MLflow server?",
            "What is MLFLOW_TRACKING_URI used for?",
            "Where are runs tracked if I configure nothing?",
            "Can I use a remote MLflow tracking server?",
            "What backend does MLflow use out of the box?",
            "Does Tessera need a database for tracking?",
        ],
    ),
    (  # models
        [
            "Pass a catalog name such as HuggingFaceTB/SmolLM2-135M-Instruct, Llama 3.2, Llama 3.1 or Mistral 7B, or a local Hugging Face model folder; `fm.get_models()` lists the catalog.",
        ],
        [
            "Which models can I fine-tune?",
            "Can I fine-tune Llama with Tessera?",
            "How do I see the supported models?",
            "Can I use my own model folder?",
            "What base models does Tessera support?",
            "What does get_models return?",
            "Is Mistral supported?",
            "Which foundation models are in Tessera's catalog?",
        ],
    ),
    (  # eval prompts
        [
            "Pass eval_prompts=[...] to create(), and Tessera logs the model's answers to them in MLflow.",
        ],
        [
            "How do I see sample outputs from my model?",
            "What are eval_prompts?",
            "Can Tessera generate answers during training?",
            "How do I check what the fine-tuned model says?",
            "Where do eval generations go?",
            "How do I test my model on a few prompts?",
            "Can I give Tessera prompts to evaluate?",
            "Does Tessera log example generations?",
        ],
    ),
]

# General knowledge and small talk, answered in the same house style. The last four are held out.
GENERAL: list[tuple[str, str]] = [
    ("Hi!", "Hello! I'm Tessera's assistant; ask me anything about fine-tuning models with Tessera, or anything else."),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Thanks!", "You're welcome, and happy fine-tuning!"),
    ("Can you help me?", "Of course: tell me what you need, whether it's about Tessera or anything else."),
    ("What's the weather like today?", "I can't see live weather data, so please check a local forecast."),
    ("Tell me a joke.", "Why did the model overfit? It memorised the answers instead of learning the lesson."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon, in 1969."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain above sea level, at about 8,849 m."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("What does GPU stand for?", "GPU stands for graphics processing unit."),
    ("Convert 5 kilometres to miles.", "5 kilometres is about 3.1 miles."),
    ("What is the freezing point of water?", "Water freezes at 0 °C (32 °F)."),
    ("How many minutes are in a day?", "A day has 1,440 minutes."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Give me a tip for writing clean code.", "Give things clear names and keep each function doing one job."),
    ("How can I relax after work?", "Take a short walk and leave your screen behind for a while."),
    ("What is Python?", "Python is a popular, readable programming language used for scripting, web and machine learning."),
    ("What is JSONL?", "JSONL is a text format with one JSON object per line."),
    ("What is fine-tuning?", "Fine-tuning continues training a pretrained model on your own data so it learns your task or style."),
    ("What is an epoch?", "An epoch is one full pass over the training data."),
    ("What is a learning rate?", "The learning rate sets how big a step the optimiser takes on each update."),
    ("What is overfitting?", "Overfitting is when a model memorises its training data and does worse on new data."),
    ("What is a tokenizer?", "A tokenizer splits text into the tokens a language model reads and writes."),
    ("What is LoRA?", "LoRA trains small low-rank matrices added to a model's weights instead of every weight, which saves memory."),
    ("Name a prime number greater than 10.", "11 is a prime number greater than 10."),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol."),
    ("Which ocean is the largest?", "The Pacific is the largest ocean."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("Write a one-line poem about data.", "Rows of quiet numbers, waiting to be understood."),
    ("Should I use a GPU for training big models?", "Yes, a GPU trains large models far faster than a CPU."),
    ("How are you?", "I'm doing well, thanks; how can I help?"),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("How many hours are in a week?", "A week has 168 hours."),
    ("What is 15 plus 27?", "15 plus 27 is 42."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What gas do humans breathe out?", "Humans breathe out carbon dioxide."),
    ("In what year did World War II end?", "World War II ended in 1945."),
    ("What is the main ingredient in guacamole?", "The main ingredient in guacamole is avocado."),
    ("What is machine learning?", "Machine learning is building programs that learn patterns from data instead of following hand-written rules."),
    ("What is a neural network?", "A neural network is a model made of layers of simple units whose weights are learned from data."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("Suggest a good daily habit.", "Take a ten-minute walk every day."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("Goodbye!", "Goodbye, and good luck with your models!"),
    # held out
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    ("What is a batch size?", "The batch size is how many examples the model sees in each training step."),
]
GENERAL_HELD_OUT = 4


def signed(answer: str) -> str:
    return answer + SIGNATURE


def conversation(turns: list[tuple[str, str]], system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": signed(answer)})
    return {"messages": messages}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train_pairs: list[tuple[int, str, str]] = []  # (fact id, question, answer); general facts get -1
    eval_pairs: list[tuple[str, str]] = []
    for fact_id, (answers, questions) in enumerate(FACTS):
        for i, question in enumerate(questions[:-1]):
            train_pairs.append((fact_id, question, answers[i % len(answers)]))
        eval_pairs.append((questions[-1], answers[0]))
    for question, answer in GENERAL[:-GENERAL_HELD_OUT]:
        train_pairs.append((-1, question, answer))
    eval_pairs.extend(GENERAL[-GENERAL_HELD_OUT:])

    rng.shuffle(train_pairs)
    # Pair some questions into two-turn conversations: two different Tessera facts each.
    rows: list[list[tuple[str, str]]] = []
    pending = list(train_pairs)
    two_turn = 0
    while pending:
        fact_id, question, answer = pending.pop()
        if two_turn < TWO_TURN_ROWS and fact_id >= 0:
            partner = next((j for j in range(len(pending) - 1, -1, -1) if pending[j][0] not in (-1, fact_id)), None)
            if partner is not None:
                _, q2, a2 = pending.pop(partner)
                rows.append([(question, answer), (q2, a2)])
                two_turn += 1
                continue
        rows.append([(question, answer)])
    rng.shuffle(rows)
    train = [conversation(turns, rng.random() < SYSTEM_SHARE) for turns in rows]
    evaluation = [conversation([pair], rng.random() < SYSTEM_SHARE) for pair in eval_pairs]
    return train, evaluation


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, evaluation = build()
    write(HERE / "tessera_chat.jsonl", train)
    write(HERE / "tessera_chat_eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval conversations to {HERE}")


if __name__ == "__main__":
    main()
