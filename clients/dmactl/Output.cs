using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Google.Protobuf;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace DmaBroker.Ctl;

/// <summary>A table cell: its text and, on a terminal, its colour.</summary>
internal readonly record struct Cell(string Text, Style? Style = null)
{
    public static implicit operator Cell(string text) => new(text);
}

/// <summary>
/// Tables for people, JSON for scripts. Colours only when stdout is a terminal (and NO_COLOR is
/// unset); progress only when stderr is one. Every JSON document is one compact line, so
/// <c>watch --json</c> is NDJSON and every other command prints exactly one document.
/// </summary>
internal sealed class Output
{
    // Indented = false: one document, one line. Relaxed escaping: messages keep their quotes readable.
    private static readonly JsonWriterOptions JsonOptions = new() { Indented = false, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
    private readonly bool _colour;

    public Output(TextWriter stdout, TextWriter stderr, bool json, bool stdoutIsTerminal, bool stderrIsTerminal)
    {
        Writer = stdout;
        ErrorWriter = stderr;
        Json = json;
        ErrorIsTerminal = stderrIsTerminal;
        _colour = stdoutIsTerminal && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NO_COLOR"))
            && Environment.GetEnvironmentVariable("TERM") != "dumb";
    }

    /// <summary>dmactl's own streams, with terminal detection.</summary>
    public static Output ForConsole(bool json) =>
        new(Console.Out, Console.Error, json, !Console.IsOutputRedirected, !Console.IsErrorRedirected);

    public bool Json { get; }

    public TextWriter Writer { get; }

    public TextWriter ErrorWriter { get; }

    /// <summary>Whether stderr is a terminal: where progress bars go, and only then.</summary>
    public bool ErrorIsTerminal { get; }

    public void Message(IMessage message) => Document(json => ProtoJson.Write(json, message));

    /// <summary>Writes one JSON document as one line on stdout.</summary>
    public void Document(Action<Utf8JsonWriter> write) => Writer.WriteLine(Serialize(write));

    public void Line(string text) => Writer.WriteLine(text);

    /// <summary>A command's outcome: <paramref name="line"/> for people, or with --json one object of <paramref name="fields"/>.</summary>
    public void Result(string line, params (string Name, object Value)[] fields)
    {
        if (!Json)
        {
            Line(line);
            return;
        }
        Document(json =>
        {
            json.WriteStartObject();
            foreach (var (name, value) in fields)
            {
                json.WritePropertyName(name);
                ProtoJson.WriteScalar(json, value);
            }
            json.WriteEndObject();
        });
    }

    /// <summary>A borderless table: a bold header, then one line per row, columns two spaces apart.</summary>
    public void Table(string[] header, IEnumerable<Cell[]> rows)
    {
        var table = new Table().Border(TableBorder.None);
        for (var i = 0; i < header.Length; i++)
            table.AddColumn(new TableColumn(new Text(header[i], new Style(decoration: Decoration.Bold))).Padding(0, 0, i == header.Length - 1 ? 0 : 2, 0).NoWrap());
        foreach (var row in rows)
            table.AddRow(row.Select(c => (IRenderable)new Text(c.Text, c.Style ?? Style.Plain)));
        // Rendered into a buffer first, to drop the padding Spectre leaves at the end of a row.
        using var rendered = new StringWriter(CultureInfo.InvariantCulture);
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = _colour ? AnsiSupport.Yes : AnsiSupport.No,
            ColorSystem = _colour ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
            Interactive = InteractionSupport.No,
            Out = new AnsiConsoleOutput(rendered),
        });
        // Never squeeze or wrap a row: scripts read lines, and a terminal wraps a long one by itself (as kubectl's do).
        console.Profile.Width = 4096;
        console.Write(table);
        foreach (var line in rendered.ToString().Split('\n'))
        {
            if (line.Length > 0)
                Writer.WriteLine(line.TrimEnd());
        }
    }

    /// <summary>
    /// Runs <paramref name="work"/> under a progress bar on stderr when stderr is a terminal (never on
    /// stdout, never into a pipe or file). The work reports progress as (value out of
    /// <paramref name="max"/>, a short status); without a terminal the reports go nowhere.
    /// </summary>
    public async Task<T> WithProgressAsync<T>(string description, double max, Func<Action<double, string>, Task<T>> work)
    {
        if (!ErrorIsTerminal)
            return await work(static (_, _) => { });
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.Yes,
            ColorSystem = ColorSystemSupport.Detect,
            Interactive = InteractionSupport.Yes,
            Out = new AnsiConsoleOutput(ErrorWriter),
        });
        return await console.Progress()
            .AutoClear(true)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
            .StartAsync(async context =>
            {
                var task = context.AddTask(description, maxValue: max);
                return await work((value, status) =>
                {
                    task.Value = value;
                    task.Description = $"{description}: {Markup.Escape(status)}";
                });
            });
    }

    /// <summary>
    /// Reports a failure on stderr: <c>dmactl: message</c>, or with --json
    /// <c>{"error":{"kind":…,"errno":"EBUSY","code":16,"message":…}}</c>. Returns the exit code.
    /// </summary>
    public int Fail(Failure failure)
    {
        if (Json)
        {
            ErrorWriter.WriteLine(Serialize(json =>
            {
                json.WriteStartObject();
                json.WriteStartObject("error");
                json.WriteString("kind", failure.Kind);
                json.WriteString("errno", failure.Errno);
                if (failure.Code is { } code)
                    json.WriteNumber("code", code);
                else
                    json.WriteNull("code");
                json.WriteString("message", failure.Message);
                json.WriteEndObject();
                json.WriteEndObject();
            }));
        }
        else
        {
            ErrorWriter.WriteLine($"dmactl: {failure.Text}");
        }
        return failure.ExitCode;
    }

    public static string Hex(uint value, int digits) => value.ToString("x" + digits.ToString(CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);

    /// <summary>One compact JSON document as a string.</summary>
    public static string Serialize(Action<Utf8JsonWriter> write)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer, JsonOptions))
            write(json);
        return Encoding.UTF8.GetString(buffer.GetBuffer(), 0, (int)buffer.Length);
    }
}
