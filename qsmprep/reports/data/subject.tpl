<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="qsmprep, with NiReports' assembler">
<title>{{ title }}</title>
<style>
body { font-family: Helvetica, Arial, sans-serif; margin: 0 2em 3em 2em; color: #222; max-width: 1400px; }
nav { position: sticky; top: 0; background: #f4f4f4; padding: 0.5em 1em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1.5em; color: #0b5394; text-decoration: none; }
h1 { border-bottom: 2px solid #0b5394; padding-top: 1em; }
h2 { color: #0b5394; font-size: 1.1em; }
h3 { font-size: 1em; margin-bottom: 0.2em; }
p.elem-caption { color: #555; font-size: 0.9em; margin-top: 0; }
table.metrics { border-collapse: collapse; font-size: 0.9em; }
table.metrics th { text-align: left; font-weight: normal; color: #555; padding: 2px 1.5em 2px 0; }
table.metrics td { padding: 2px 0; }
li.warning { color: #8a5a00; }
li.error { color: #a00000; }
img { max-width: 100%; }
small { display: none; }
</style>
</head>
<body>
<nav>
{% for sub_report in sections %}<a href="#{{ sub_report.name | replace(' ', '-') }}">{{ sub_report.name }}</a>{% endfor %}
</nav>
<h1 style="border: none;">{{ title }}</h1>
{% for sub_report in sections %}
<div id="{{ sub_report.name | replace(' ', '-') }}">
<h1>{{ sub_report.name }}</h1>
{% for reportlet in sub_report.reportlets %}
<div class="reportlet-block">
{% if reportlet.title %}<h2>{{ reportlet.title }}</h2>{% endif %}
{% if reportlet.subtitle %}<h3>{{ reportlet.subtitle }}</h3>{% endif %}
{% for element in reportlet.components %}
{% if element[0] %}{% if element[1] %}<p class="elem-caption">{{ element[1] }}</p>{% endif %}{{ element[0] }}{% endif %}
{% endfor %}
</div>
{% endfor %}
</div>
{% endfor %}
</body>
</html>
