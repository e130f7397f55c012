"""The default model's training corpus: simple children's stories (in the spirit of
TinyStories), written by a seeded procedural generator, so nothing is downloaded and the same
seed gives the same stories on any machine.

    from apex_mini.stories import build_corpus, write_story
    train, val = build_corpus(num_stories=40000, val_fraction=0.02, seed=0)

Each story is drawn from one of the plots below. A plot is a list of steps; a step is a tuple
of alternative templates (one is picked), and "|" starts a new paragraph. The slots
({H}, {he}, {obj}, ...) are filled once per story, so names, pronouns and articles must agree
across sentences: the model has to learn that agreement, not a fixed text.
"""
from __future__ import annotations

import random

GIRLS = ("Lily Mia Sue Anna Emma Lucy Sara Amy Zoe Ella Rose Kate Jane Molly Daisy Ruby Lola "
         "Nina Ivy Grace Hannah Chloe Sophie Maya Kim Pam Jenny Bella Polly Tina Lisa Mary Olivia "
         "Ava Lucy Clara Alice Julia Eva Sally Rosie Hazel Lena Nora Penny Wendy").split()
BOYS = ("Tom Ben Max Sam Tim Jack Leo Jake Finn Bob Joe Dan Ollie Noah Luke Adam Oscar Henry "
        "Billy Toby Timmy Alex Jim Ned Ray Theo Eli Kevin Peter Ted Mark Paul Nick Charlie "
        "Harry Jacob Lucas Mike Will Zack Arlo Felix Hugo Otto").split()
ANIMALS = ("dog cat bunny bird bear fox mouse duck frog owl pig lamb horse squirrel turtle "
           "monkey puppy kitten cow goat hen deer hedgehog raccoon penguin tiger lion elephant "
           "giraffe zebra bee ladybug dragon").split()
PET_NAMES = ("Spot Fluffy Buddy Whiskers Coco Pip Sunny Bubbles Pepper Rusty Tiny Snowy Nibbles "
             "Hoppy Patch Goldie Ziggy Bingo Fuzzy Lucky Biscuit Peanut Muffin Cookie Toffee "
             "Shadow Button Pickles Waffles Socks Blue Dot Honey Ginger Benny").split()
TRAITS = ("little happy kind brave shy curious silly friendly gentle playful clever small sweet "
          "cheerful funny busy young smart polite lively noisy quiet helpful careful clumsy "
          "sleepy jolly").split()
PARENTS = (("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he"),
           ("mommy", "she"), ("daddy", "he"))
PLACES = (("park", "in"), ("forest", "in"), ("garden", "in"), ("beach", "at"), ("farm", "on"),
          ("pond", "by"), ("lake", "by"), ("playground", "at"), ("meadow", "in"), ("woods", "in"),
          ("river", "by"), ("backyard", "in"), ("hill", "on"), ("zoo", "at"), ("field", "in"),
          ("jungle", "in"), ("village", "in"), ("market", "at"), ("library", "at"),
          ("big tree", "under"), ("castle", "at"), ("snowy hill", "on"), ("pool", "at"))
OBJECTS = ("ball kite doll hat book balloon truck train drum blanket shell crayon umbrella scarf "
           "bucket robot puzzle whistle wagon rocket flag bell spoon cup necklace sock ribbon "
           "marble guitar").split()
OBJECTS += ["teddy bear", "toy car", "toy boat", "music box", "jump rope", "sand pail",
            "rubber duck", "toy plane", "picture book", "snow globe"]
COLORS = ("red blue green yellow pink purple orange brown white black gold silver shiny soft big "
          "small new old pretty tiny fluffy striped spotted").split()
FOODS = ("cookies apples cupcakes sandwiches strawberries muffins pancakes carrots cherries "
         "grapes cakes pies tarts biscuits waffles buns pretzels").split()
ACTIVITIES = (("play tag", "played tag"), ("run in the grass", "ran in the grass"),
              ("jump in puddles", "jumped in puddles"), ("sing songs", "sang songs"),
              ("draw pictures", "drew pictures"), ("build sand castles", "built sand castles"),
              ("climb trees", "climbed trees"), ("pick flowers", "picked flowers"),
              ("look at the clouds", "looked at the clouds"), ("dance", "danced"),
              ("play hide and seek", "played hide and seek"), ("read books", "read books"),
              ("chase butterflies", "chased butterflies"), ("play with blocks", "played with blocks"),
              ("roll down the hill", "rolled down the hill"),
              ("splash in the water", "splashed in the water"), ("ride bikes", "rode bikes"),
              ("make mud pies", "made mud pies"), ("play on the swings", "played on the swings"),
              ("look for bugs", "looked for bugs"), ("throw a ball", "threw a ball"),
              ("play music", "played music"), ("paint pictures", "painted pictures"),
              ("go for walks", "went for walks"), ("count the stars", "counted the stars"),
              ("make funny faces", "made funny faces"), ("skip and hop", "skipped and hopped"),
              ("feed the ducks", "fed the ducks"), ("tell jokes", "told jokes"))
TIMES = ("One day", "One sunny day", "One morning", "One afternoon", "One summer day",
         "One bright morning", "The next day", "One warm day", "On a sunny morning", "One evening",
         "One cold morning", "One windy day", "Last summer", "On Saturday", "One fine day",
         "Early one morning", "After lunch", "One spring day")
GOOD = ("happy", "glad", "proud", "excited", "very happy", "so happy", "joyful", "very proud")
SAD = ("sad", "very sad", "upset", "unhappy", "so sad", "grumpy", "worried", "gloomy")

# (what scares the hero, what the hero then did, how it turned out)
FEARS = (
    ("the big slide", "climbed up the big slide and slid all the way down",
     "It was fast and fun!"),
    ("the deep water", "put {his} feet in the water and began to kick and swim",
     "The water was cool and nice."),
    ("the dark", "turned off the light and closed {his} eyes",
     "The dark was soft and quiet, and soon {he} was asleep."),
    ("the big dog next door", "walked up to the big dog and said hello",
     "The dog wagged its tail and licked {his} hand."),
    ("the tall tree", "climbed up the tall tree, one branch at a time",
     "From the top, {he} could see the whole town."),
    ("the loud thunder", "held {his} {par}'s hand and counted to ten",
     "Soon the storm went away and the sky was blue again."),
)
# (who is in trouble, the trouble, the help, the outcome)
TROUBLES = (
    ("a little bird", "had a hurt wing", "made a soft bed for the bird and gave it some water",
     "After a few days, the bird could fly again."),
    ("a small kitten", "was stuck up in a tree", "got {his} {par} and a ladder, and they helped "
     "the kitten down", "The kitten said, \"Meow!\" and rubbed against {his} legs."),
    ("a baby duck", "could not find its mom", "walked all around the pond with the baby duck",
     "At last they found the mother duck, and the baby duck swam to her."),
    ("a baby turtle", "was stuck on its back", "gently turned the turtle over",
     "The turtle walked slowly back to the water."),
    ("a tiny frog", "was stuck in a jar", "carefully opened the jar",
     "The frog jumped out and said, \"Ribbit!\""),
    ("a little puppy", "was cold and wet in the rain", "wrapped the puppy in {his} {obj_or_blanket}",
     "The puppy stopped shaking and fell asleep."),
)
# (what was found, what the hero did with it, the surprise)
FINDS = (
    ("a big box", "opened the box", "Inside, there were lots of old toys to play with."),
    ("a shiny key", "tried the key in the door of the old shed",
     "The door opened, and inside there was a bike with a big red bow."),
    ("a tiny door at the bottom of a tree", "knocked on the tiny door",
     "A little mouse came out and said, \"Hello! Do you want to have tea?\""),
    ("a big egg in the grass", "watched the egg for a long time",
     "Crack! A baby bird came out and said, \"Peep!\""),
    ("a map under a rock", "followed the map",
     "At the end of the map, there was a box full of shiny stones."),
    ("a bottle with a note inside", "opened the bottle and read the note",
     "The note said, \"Will you be my friend?\""),
)
# (the skill, what went wrong at first, how it finally went)
SKILLS = (
    ("ride a bike", "{he} wobbled and fell down", "{he} pedaled all the way down the street"),
    ("fly a kite", "the kite fell to the ground", "the wind took the kite high into the sky"),
    ("swim", "{he} sank and got water in {his} nose", "{he} kicked {his} legs and swam across the pool"),
    ("jump rope", "the rope got stuck on {his} feet", "{he} jumped ten times in a row"),
    ("tie shoes", "the laces got all tangled", "{he} made two perfect loops"),
    ("catch a ball", "the ball hit {him} on the nose", "{he} caught the ball with both hands"),
)
# (the rule, what the hero did anyway, what went wrong)
WARNINGS = (
    ("do not play ball in the house", "threw {his} ball in the living room",
     "The ball hit a vase, and the vase fell and broke."),
    ("do not go too close to the pond", "went to the edge of the water to look at the fish",
     "{He} slipped and fell into the pond with a big splash!"),
    ("do not eat too many sweets", "ate all the candy in the jar",
     "Soon {his} tummy began to hurt."),
    ("stay close to me at the store", "ran off to look at the toys",
     "When {he} turned around, {his} {par} was gone."),
    ("do not touch the paint", "put {his} hands in the wet paint",
     "Now {his} hands and {his} shirt were all green."),
)
# Scene-setting sentences that fit any outdoor moment; plots mark the spots with "*".
DETAILS = ("The sun was {sun}, and the birds were {birds}.",
           "The sky was blue, and there were {cloud} clouds.",
           "A soft wind blew through the {wind}.", "Butterflies flew from flower to flower.",
           "{H} could hear {sound}.", "It was a {day_adj} day.",
           "There were {flower} flowers everywhere.", "{He} wore {his} {clothes}.",
           "The grass was green and soft.", "{He} skipped along, humming a little song.")
GIFTS = ("a picture", "a card", "a necklace made of beads", "a crown made of flowers",
         "a little clay pot", "a paper boat")
PLANTS = (("a seed", "a big yellow flower"), ("a bean", "a tall bean plant"),
          ("a little seed", "a red tomato"), ("an apple seed", "a small apple tree"),
          ("a pumpkin seed", "a big orange pumpkin"))

PLOTS = {
    "lost": [
        ("{H} had {a_obj} that {he} loved very much.", "{H}'s favorite toy was {his} {obj}.",
         "{H} had {a_obj}. {He} took it everywhere."),
        ("{Time}, {H} took {his} {obj} to the {place}.",
         "{Time}, {H} and {his} {par} went to the {place}, and {H} brought {his} {obj}."),
        "*",
        ("{He} {acted} and had lots of fun.", "{He} played {at_place} all day.",
         "The sun was warm, and {H} was very happy.", ""),
        ("When it was time to go home, {H} could not find {his} {obj}.",
         "But when {he} looked down, {his} {obj} was gone!"),
        "|",
        ('"Oh no! Where is my {obj}?" {H} cried.', '{H} felt {sad}. "I lost my {obj}," {he} said.',
         "{H} was {sad} and began to cry."),
        ('{Helper} said, "Do not worry. We will find it together."',
         '"Let\'s look for it together," said {helper}.'),
        ("They looked under the bushes. They looked behind the trees.",
         "They looked near the swings and by the big rock.", "They looked everywhere."),
        ("At last, {H} saw something under a pile of leaves. It was {his} {obj}!",
         "Then {helper} shouted, \"I see it!\" The {obj} was under a bench.",
         "Then {H} saw {his} {obj} next to a tree. {He} ran to get it."),
        "|",
        ('{H} hugged {his} {obj}. "Thank you, {helper_addr}!" {he} said.',
         "{H} was {good}. {He} held {his} {obj} tight all the way home."),
    ],
    "share": [
        ("{H} had a new {obj}. It was {color} and very nice.",
         "{H} got {a_obj} for {his} birthday. {He} loved it so much."),
        ("{Time}, {he} took it to the {place}.", "{Time}, {he} played with it {at_place}."),
        "*",
        ("{F} saw the {obj} and came over.", "{His} friend {F} came to play."),
        ('"Can I play with your {obj}?" asked {F}.',
         '{F} asked, "Can I have a turn, please?"', '"Wow! Can I try it?" said {F}.'),
        ('But {H} held it close. "No, it is mine!" {he} said.',
         '{H} did not want to share. "No. I want to play with it by myself," {he} said.'),
        ("{F} felt {sad} and walked away.", "{F} looked at the ground and did not say a word."),
        "|",
        ("{H} played alone, but it was not much fun.", "Soon {H} felt lonely."),
        ("{He} thought about {F}. {He} did not like to see {his} friend {sad}.",
         '{His} {par} said, "Toys are more fun when you share them."'),
        ('{H} ran to {F}. "I am sorry. Do you want to play with my {obj} too?" {he} asked.',
         '{H} went to {F} and said, "Here, you can have a turn."'),
        ("{F} smiled a big smile.", '"Thank you!" said {F}, and {fhe} smiled.'),
        ("They played together all day and laughed a lot.",
         "They took turns with the {obj} until the sun went down."),
    ],
    "fear": [
        ("{H} was scared of {fear}.", "There was one thing {H} did not like: {fear}."),
        ("{He} did not want to go near it.", "Every time {he} thought about it, {he} felt small.", ""),
        ("{Time}, {H} and {helper} were {at_place}.", "{Time}, {helper} came to play with {H}."),
        ('{Helper} said, "Do not be afraid. I will be right here with you."',
         '"You can do it," said {helper}. "I know you are brave."'),
        ('{H} took a deep breath. "Okay," {he} said. "I will try."',
         "{H} was still a little scared, but {he} wanted to be brave."),
        "|",
        ("Slowly, {H} {fear_did}.", "So {H} {fear_did}."),
        ("{fear_end}",),
        ('"I did it!" {H} shouted.', '{H} laughed. "That was not scary at all!" {he} said.'),
        ("{Helper} clapped and gave {him} a big hug.", "{He} felt {good} and brave."),
    ],
    "help": [
        ("{Time}, {H} was walking {at_place}.", "{Time}, {H} went for a walk to the {place}."),
        "*",
        ("{He} heard a small sound.", "{He} saw something move near a bush.", ""),
        ("It was {who_trouble}. It {trouble}.", "There was {who_trouble} that {trouble}."),
        ('"Oh, you poor thing," said {H}. "I will help you."',
         '{H} felt {sad} for it. "Don\'t worry, I will help," {he} said.'),
        "|",
        ("{H} {help_did}.", "Very carefully, {H} {help_did}."),
        ("{help_end}",),
        ("{H} smiled. Helping others made {him} feel {good}.",
         "{H} felt warm inside. It was good to help.", "{H} was {good} that {he} could help."),
    ],
    "discovery": [
        ("{H} loved to explore.", "{H} was a very curious {kind}.", ""),
        ("{Time}, {he} went to the {place} to look for something new.",
         "{Time}, {H} and {F} went to play {at_place}."),
        "*",
        ("Under a big tree, {he} found {find}.", "Behind a rock, {H} saw {find}.",
         "Near the path, there was {find}."),
        ('"What is this?" {H} said.', '"Look!" said {H}. "What can it be?"',
         "{H} was very curious."),
        "|",
        ("{He} {find_did}.", "After a while, {H} {find_did}."),
        ("{find_end}",),
        ("{H} could not believe it.", '"Wow!" said {H}.', "{H} jumped up and down."),
        ("{He} ran home to tell {his} {par} all about it.",
         "It was the best day ever.", "{H} would never forget that day."),
    ],
    "baking": [
        ("{Time}, {H} and {his} {par} wanted to make {food}.",
         "{Time}, {H}'s {par} said, \"Let's make some {food} today!\""),
        ('"Yay!" said {H}. "Can I help?"', "{H} was so excited. {He} loved to help in the kitchen."),
        ("They put flour, sugar and eggs in a big bowl.",
         "First, they got a bowl, some flour, some milk and two eggs."),
        ("{H} mixed and mixed.", "{H} stirred the bowl with a big spoon."),
        ("Oops! Some flour went on {his} nose.", "A little milk spilled on the floor.", ""),
        "|",
        ("They put the {food} in the oven and waited.", "Then the {food} went into the hot oven."),
        ("The kitchen smelled so good.", "Soon the whole house smelled sweet."),
        ("When the {food} were ready, {H} took one bite.", "At last, the {food} were done."),
        ('"Yum!" said {H}. "These are the best {food} ever!"', '"Mmm, so good!" said {H}.'),
        ("{He} shared the {food} with {F}, and everyone was {good}.",
         "They gave some {food} to {F} too."),
    ],
    "learn": [
        ("{H} wanted to learn to {skill}.", "{H} wished {he} could {skill} like the big kids."),
        ("{Time}, {he} tried for the first time.", "{Time}, {helper} helped {him} try."),
        ("But {skill_fail}.", "It was hard. {skill_fail_cap}."),
        ('"I can\'t do it," {H} said. {He} felt {sad}.', "{H} wanted to give up."),
        "|",
        ('{Helper} said, "Try again. Everyone falls at first."',
         '"Don\'t give up," said {helper}. "You are getting better."'),
        ("So {H} tried again, and again, and again.", "{H} practiced every day."),
        ("At last, {skill_win}!", "Then one day, {skill_win}!"),
        ('"I did it!" {H} shouted. "I can {skill}!"', "{H} was {good}."),
    ],
    "quarrel": [
        ("{H} and {F} were best friends.", "{H} and {F} liked to play together every day."),
        ("{Time}, they were playing with {a_obj} {at_place}.", "{Time}, they found {a_obj} {at_place}."),
        "*",
        ('"It is my turn!" said {H}.', '"I want it!" said {H}.'),
        ('"No, it is my turn!" said {F}.', '"No, I had it first!" shouted {F}.'),
        ("They both pulled the {obj}.", "They pulled and pulled."),
        ("Rip! The {obj} broke.", "Then, snap! The {obj} broke in two."),
        "|",
        ("{H} and {F} were {sad}. They did not talk.", "Now nobody could play with it."),
        ('After a while, {H} said, "I am sorry, {F}."', '{H} looked at {F}. "I am sorry," {he} said.'),
        ('"I am sorry too," said {F}.', '{F} said, "Me too. Let\'s not fight."'),
        ("Together, they fixed the {obj} with some tape.", "{H}'s {par} helped them fix the {obj}."),
        ("Then they took turns and played happily.", "Soon they were laughing again."),
    ],
    "rain": [
        ("{Time}, {H} wanted to go to the {place}.", "{H} had a plan to {act} {at_place}."),
        ("But when {he} looked out the window, it was raining.",
         "But then dark clouds came, and big drops of rain began to fall."),
        ('"Oh no," said {H}. "Now I can\'t go outside."', "{H} was {sad}. {He} sat by the window."),
        "|",
        ('{Helper} said, "We can have fun inside too!"', "Then {helper} had an idea."),
        ("They built a fort with pillows and blankets.", "They played a game with cards.",
         "They made a puppet show with old socks."),
        ("{H} laughed and forgot all about the rain.", "It was so much fun."),
        "|",
        ("Later, the rain stopped and the sun came out.", "After a while, the sky turned blue again."),
        ("There was a big rainbow in the sky!", "{H} saw a rainbow over the trees."),
        ("{H} ran outside and jumped in the puddles.", '"What a great day," said {H}.'),
    ],
    "race": [
        ("{H} and {F} liked to run.", "{H} was a fast runner, and so was {F}."),
        ('{Time}, {F} said, "Let\'s race to the big tree!"',
         '{Time}, {H} said, "I bet I can run faster than you!"'),
        ('"Ready, set, go!" they shouted.', "They lined up and counted to three."),
        "*",
        ("They ran as fast as they could.", "Off they went across the {place}."),
        ("{H} was in front.", "{H} was winning."),
        "|",
        ("Then {F} tripped on a rock and fell down.", 'Then {H} heard a cry. {F} had fallen down.'),
        ("{H} could win the race, but {he} stopped.", "{H} did not keep running."),
        ('{He} ran back to {F}. "Are you okay?" {he} asked.', "{He} went back and helped {F} up."),
        ('"Thank you," said {F}. "You are a good friend."', "{F} smiled at {him}."),
        ("They walked to the big tree together, hand in hand.",
         "They finished the race together, and they both laughed."),
    ],
    "gift": [
        ("{Time}, {H} found out that it was {his} {par}'s birthday.",
         "It was almost {F}'s birthday, and {H} wanted to give a gift."),
        ("But {H} did not have any money.", "{H} thought and thought about what to give."),
        ("So {he} decided to make {gift}.", "Then {he} had an idea. {He} would make {gift}!"),
        ("{He} worked very hard.", "{He} used glue, paper and lots of colors.",
         "It took a long time, but {he} did not stop."),
        "|",
        ("When it was ready, {H} gave the gift with a big smile.", "At the party, {H} gave {his} gift."),
        ('"I made it just for you," {he} said.', '"Happy birthday!" said {H}.'),
        ('"I love it! It is the best gift ever," came the answer, with a big hug.',
         "Everyone said it was the nicest gift of all."),
        ("{H} felt {good}.", "{H} learned that the best gifts come from the heart."),
    ],
    "warning": [
        ('{His} {par} always said, "{Rule}."', 'One day, {his} {par} told {him}, "Please {rule}."'),
        ("But {H} did not listen.", "{H} nodded, but {he} forgot.",
         "{H} thought it would be okay, just this once."),
        ("{Time}, {he} {rule_did}.", "Later, {he} {rule_did}."),
        ("{rule_end}",),
        "|",
        ('"Oh no!" cried {H}. {He} felt {sad}.', "{H} began to cry."),
        ("{His} {par} came quickly.", "{His} {par} ran to {him}."),
        ('"I am sorry," said {H}. "I should have listened."',
         '{H} said, "I am sorry. I will listen next time."'),
        ('{His} {par} hugged {him}. "It is okay. Now you know why," {parhe} said.',
         "{His} {par} gave {him} a hug and helped {him} clean up."),
    ],
    "new_friend": [
        ("{H} lived in a small house near the {place}.", "{H} had just moved to a new town."),
        ("{He} did not have any friends.", "{He} felt lonely.", "{He} had nobody to play with."),
        ("{Time}, {he} saw {fk_a} {at_place}.", "{Time}, {he} met {fk_a} named {F}."),
        "*",
        ("{H} was shy. {He} did not know what to say.", "{H} wanted to say hello, but {he} was shy."),
        ('Then {F} said, "Hi! I am {F}. Do you want to play?"',
         '{F} walked over and said, "Hello! What is your name?"'),
        "|",
        ('"I am {H}," said {H}. "Yes, I want to play!"', '{H} smiled and said, "My name is {H}."'),
        ("They {acted} together.", "They played all afternoon.", "They {acted} and laughed."),
        ("{H} was not lonely anymore.", "{H} felt {good}."),
        ("From that day on, {H} and {F} were best friends.", "Now {H} had a new best friend."),
    ],
    "garden": [
        ("{Time}, {H}'s {par} gave {him} {seed}.", "{Time}, {H} found {seed} in {his} pocket."),
        ('"Let\'s plant it," said {his} {par}.', "{H} wanted to plant it in the garden."),
        ("{H} dug a little hole and put the seed in it.", "{He} put {seed} in the soil."),
        ("{He} gave it water every day.", "Every morning, {H} watered the soil."),
        "|",
        ("But nothing happened.", "For many days, {he} saw nothing at all."),
        ('"Why is it not growing?" asked {H}.', "{H} was {sad} and wanted to give up."),
        ('"Be patient," said {his} {par}. "Good things take time."',),
        ("Then one morning, {H} saw a tiny green leaf!", "Then one day, a little green sprout came up!"),
        "|",
        ("It grew and grew, and soon there was {plant}.", "After many weeks, it became {plant}."),
        ("{H} was {good}.", '"Look what I grew!" {H} said.'),
    ],
}

MORALS = {
    "lost": ("it is good to take care of your things", "friends help each other"),
    "share": ("sharing is caring", "playing together is more fun than playing alone"),
    "fear": ("it is good to be brave", "trying new things can be fun"),
    "help": ("it is good to help others", "being kind makes everyone happy"),
    "discovery": ("the world is full of surprises",),
    "baking": ("food tastes better when you share it", "working together is fun"),
    "learn": ("you should never give up", "practice makes things easier"),
    "quarrel": ("it is better to share than to fight", "saying sorry can fix a lot of things"),
    "rain": ("you can have fun on any day",),
    "race": ("friends are more important than winning", "being kind is better than winning"),
    "gift": ("the best gifts come from the heart",),
    "warning": ("it is important to listen", "rules keep us safe"),
    "new_friend": ("saying hello can make a new friend",),
    "garden": ("good things take time", "being patient is important"),
}
OPENINGS = (
    "Once upon a time, there was a {trait} {kind} named {H}.",
    "Once upon a time, there was a {trait} {kind} called {H}.",
    "Once upon a time, in a small town, there lived a {trait} {kind} named {H}.",
    "Once there was a {trait} {kind} named {H}.",
    "There once was a {trait} {kind} named {H} who loved to {act}.",
    "{H} was a {trait} {kind}.",
    "One day, a {trait} {kind} named {H} woke up early.",
    "There was once {kind_a} named {H}. {He} was very {trait}.",
)
LIKES = ("{He} loved to {act}.", "{He} liked to {act} with {his} friends.",
         "Every day, {he} liked to {act} {at_place}.", "{He} lived with {his} {par} in a little house.",
         "{He} was {age} years old.", "", "")
ENDINGS = (
    "From that day on, {H} was always {good}.", "{H} went to bed with a big smile on {his} face.",
    "And they all lived happily ever after.", "It was a very good day.", "",
)
# Plots whose mood the cheerful endings above would break.
PLOT_ENDINGS = {
    "warning": ("From that day on, {H} always listened to {his} {par}.", "{H} never forgot that day.",
                "The next time, {H} remembered what {his} {par} said.", ""),
    "quarrel": ("{H} and {F} never fought over a toy again.", "They stayed best friends forever.", ""),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cast(rng: random.Random) -> dict[str, str]:
    """A hero, a friend, a helper and the props, as template slots."""
    def person():
        if rng.random() < 0.7:
            girl = rng.random() < 0.5
            return rng.choice(GIRLS if girl else BOYS), ("girl" if girl else "boy"), girl
        return rng.choice(PET_NAMES), rng.choice(ANIMALS), rng.random() < 0.5

    H, kind, girl = person()
    F, fkind, fgirl = person()
    while F == H:
        F, fkind, fgirl = person()
    par, parhe = rng.choice(PARENTS)
    place, prep = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    if rng.random() < 0.6:
        obj = rng.choice(COLORS) + " " + obj
    act, acted = rng.choice(ACTIVITIES)
    he, him, his = ("she", "her", "her") if girl else ("he", "him", "his")
    s = dict(H=H, kind=kind, kind_a=_article(kind), he=he, him=him, his=his, F=F, fk=fkind, fk_a=_article(fkind),
             fhe="she" if fgirl else "he", par=par, parhe=parhe, place=place,
             at_place=f"{prep} the {place}", obj=obj, a_obj=_article(obj), act=act, acted=acted,
             food=rng.choice(FOODS), color=rng.choice(COLORS[:7]), trait=rng.choice(TRAITS),
             Time=rng.choice(TIMES), good=rng.choice(GOOD), sad=rng.choice(SAD),
             age=rng.choice(("three", "four", "five", "six", "seven")), gift=rng.choice(GIFTS),
             obj_or_blanket=rng.choice(("blanket", "scarf", "jacket")),
             sun=rng.choice(("shining", "warm", "bright", "high in the sky")),
             birds=rng.choice(("singing", "chirping", "flying high", "singing in the trees")),
             cloud=rng.choice(("big white", "fluffy", "little", "soft white")),
             wind=rng.choice(("trees", "grass", "leaves", "flowers")),
             sound=rng.choice(("the birds singing", "the leaves rustling", "the bees buzzing",
                               "the frogs croaking", "a dog barking far away")),
             day_adj=rng.choice(("lovely", "beautiful", "warm", "bright", "perfect")),
             flower=rng.choice(("red", "yellow", "pink", "purple", "white")),
             clothes=rng.choice(("red boots", "blue coat", "favorite hat", "yellow raincoat",
                                 "new shoes", "green sweater", "striped socks")))
    # The helper is a parent or the friend; templates say {helper} mid-sentence, {Helper} first.
    if rng.random() < 0.5:
        s.update(helper=f"{his} {par}", Helper=f"{his.capitalize()} {par}", helper_addr=par.capitalize())
    else:
        s.update(helper=F, Helper=F, helper_addr=F)
    fear, fear_did, fear_end = rng.choice(FEARS)
    who, trouble, help_did, help_end = rng.choice(TROUBLES)
    find, find_did, find_end = rng.choice(FINDS)
    skill, fail, win = rng.choice(SKILLS)
    rule, rule_did, rule_end = rng.choice(WARNINGS)
    seed, plant = rng.choice(PLANTS)
    s.update(fear=fear, fear_did=fear_did, fear_end=fear_end, who_trouble=who, trouble=trouble,
             help_did=help_did, help_end=help_end, find=find, find_did=find_did, find_end=find_end,
             skill=skill, skill_fail=fail,
             skill_win=win, rule=rule, rule_did=rule_did, rule_end=rule_end, seed=seed, plant=plant)
    s.update(He=he.capitalize(), His=his.capitalize())
    # Slot values may hold slots themselves ("put {his} feet in the water"): fill them in once.
    s = {k: v.format_map(s) for k, v in s.items()}
    s.update(Rule=_cap(s["rule"]), skill_fail_cap=_cap(s["skill_fail"]))
    return s


def write_story(rng: random.Random) -> str:
    """One story: an opening, one plot, an ending. Paragraphs are separated by a blank line."""
    s = _cast(rng)
    plot = rng.choice(list(PLOTS))
    first = [rng.choice(OPENINGS), *rng.sample(LIKES, rng.choice((1, 1, 2)))]
    paragraphs, current = [], first
    for step in PLOTS[plot]:
        if step == "|":
            paragraphs.append(current)
            current = []
        elif step == "*":
            if rng.random() < 0.6:
                current.append(rng.choice(DETAILS))
        else:
            current.append(rng.choice(step))
    ending = [rng.choice(PLOT_ENDINGS.get(plot, ENDINGS))]
    if rng.random() < 0.5:
        ending.append(f"{{H}} learned that {rng.choice(MORALS[plot])}.")
    if rng.random() < 0.3:
        ending.append("The end.")
    if rng.random() < 0.5:
        current += ending
        paragraphs.append(current)
    else:
        paragraphs += [current, ending]
    text = "\n\n".join(" ".join(t for t in p if t) for p in paragraphs if any(p))
    return text.format_map(s)


def build_corpus(num_stories: int, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) stories. Same seed, same stories, on any machine: the generator
    uses nothing but Python's `random.Random`, which is the same on every platform."""
    rng = random.Random(seed)
    stories = [write_story(rng) for _ in range(num_stories)]
    n_val = max(1, round(num_stories * val_fraction))
    return stories[n_val:], stories[:n_val]
