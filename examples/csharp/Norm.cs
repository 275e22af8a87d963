// The whole-matrix mean-variance normalization of the problem normgrad starts from (its
// NormalizationForward exactly as its author wrote it), speaking the line protocol (docs/protocol.md).
//   mcs -out:norm.exe Norm.cs
//   normgrad check --exec "mono norm.exe chain" --shape 6x6   # the problem's gradient: fails
//   normgrad check --exec "mono norm.exe right" --shape 6x6   # the corrected one: passes
using System;
using System.Globalization;
using System.Text;

public static class Norm
{
    const double Epsilon = 1e-5;

    // The problem's forward, unchanged.
    public static double[,] NormalizationForward(double[,] input, int outputHeight, int outputWidth, double epsilon)
    {
        double[,] output = (double[,])input.Clone();
        double mean = 0;
        double var = 0;
        double N = outputHeight * outputWidth;
        // Calculate mean
        for (int i = 0; i < outputHeight; i++)
        {
            for (int j = 0; j < outputWidth; j++)
            {
                mean += input[i, j];
            }
        }
        mean /= N;
        // Calculate variance
        for (int i = 0; i < outputHeight; i++)
        {
            for (int j = 0; j < outputWidth; j++)
            {
                var += Math.Pow(input[i, j] - mean, 2);
            }
        }
        var /= N;
        // Normalize activations
        for (int i = 0; i < outputHeight; i++)
        {
            for (int j = 0; j < outputWidth; j++)
            {
                output[i, j] = (input[i, j] - mean) / Math.Sqrt(var + epsilon);
            }
        }
        return output;
    }

    static void Stats(double[,] x, out double mean, out double var, out double N)
    {
        int h = x.GetLength(0), w = x.GetLength(1);
        N = h * w;
        mean = 0;
        foreach (double v in x) mean += v;
        mean /= N;
        var = 0;
        foreach (double v in x) var += Math.Pow(v - mean, 2);
        var /= N;
    }

    // The problem's chain rule, transcribed as derived there:
    //   dOutput/dx = (dy2/dy1)(dy1/dx) + (dy2/dsigma2)(dsigma2/dx)
    // with dy1/dx = 1, dy2/dy1 = 1/sqrt(var+eps), dy2/dsigma2 = -1/2 y1/(var+eps)^(3/2) and
    // dsigma2/dx = 2(x-mu)/N, each taken at the element itself, times the incoming dy.
    public static double[,] ChainRuleBackward(double[,] input, double[,] dOut, double epsilon)
    {
        Stats(input, out double mean, out double var, out double N);
        double[,] dx = new double[input.GetLength(0), input.GetLength(1)];
        for (int i = 0; i < input.GetLength(0); i++)
        {
            for (int j = 0; j < input.GetLength(1); j++)
            {
                double y1 = input[i, j] - mean;
                double dy1dx = 1;
                double dy2dy1 = 1 / Math.Sqrt(var + epsilon);
                double dy2dsigma2 = -0.5 * (y1 / Math.Pow(var + epsilon, 1.5));
                double dsigma2dx = 2 * (input[i, j] - mean) / N;
                dx[i, j] = dOut[i, j] * (dy2dy1 * dy1dx + dy2dsigma2 * dsigma2dx);
            }
        }
        return dx;
    }

    // The corrected gradient: every x_j moves the mean and the variance that every output
    // uses, so dx = (dy - mean(dy) - y * mean(dy * y)) / sqrt(var + eps).
    public static double[,] CorrectBackward(double[,] input, double[,] dOut, double epsilon)
    {
        Stats(input, out double mean, out double var, out double N);
        double s = Math.Sqrt(var + epsilon);
        double mdy = 0, mdyy = 0;
        for (int i = 0; i < input.GetLength(0); i++)
            for (int j = 0; j < input.GetLength(1); j++)
            {
                mdy += dOut[i, j];
                mdyy += dOut[i, j] * (input[i, j] - mean) / s;
            }
        mdy /= N;
        mdyy /= N;
        double[,] dx = new double[input.GetLength(0), input.GetLength(1)];
        for (int i = 0; i < input.GetLength(0); i++)
            for (int j = 0; j < input.GetLength(1); j++)
                dx[i, j] = (dOut[i, j] - mdy - (input[i, j] - mean) / s * mdyy) / s;
        return dx;
    }

    // -- the protocol: `<ndim> <d1> ... <dn> <v1> ... <vN>`; matrices only (ndim 2) --------

    static double[,] ReadMatrix(string[] tok, ref int k)
    {
        if (int.Parse(tok[k++], CultureInfo.InvariantCulture) != 2)
            throw new FormatException("this program takes matrices (ndim 2)");
        int h = int.Parse(tok[k++], CultureInfo.InvariantCulture);
        int w = int.Parse(tok[k++], CultureInfo.InvariantCulture);
        double[,] m = new double[h, w];
        for (int i = 0; i < h; i++)
            for (int j = 0; j < w; j++)
                m[i, j] = double.Parse(tok[k++], NumberStyles.Float, CultureInfo.InvariantCulture);
        return m;
    }

    static string WriteMatrix(double[,] m)
    {
        var sb = new StringBuilder();
        sb.Append("2 ").Append(m.GetLength(0)).Append(' ').Append(m.GetLength(1));
        foreach (double v in m) sb.Append(' ').Append(v.ToString("G17", CultureInfo.InvariantCulture));
        return sb.ToString();
    }

    public static int Main(string[] args)
    {
        if (args.Length != 1 || (args[0] != "chain" && args[0] != "right"))
        {
            Console.Error.WriteLine("usage: mono norm.exe chain|right");
            return 2;
        }
        bool chain = args[0] == "chain";
        string line;
        while ((line = Console.In.ReadLine()) != null)
        {
            string[] tok = line.Split(' ');
            string answer;
            try
            {
                int k = 1;
                double[,] x = ReadMatrix(tok, ref k);
                if (tok[0] == "forward")
                    answer = WriteMatrix(NormalizationForward(x, x.GetLength(0), x.GetLength(1), Epsilon));
                else if (tok[0] == "backward")
                {
                    double[,] dy = ReadMatrix(tok, ref k);
                    answer = WriteMatrix(chain ? ChainRuleBackward(x, dy, Epsilon) : CorrectBackward(x, dy, Epsilon));
                }
                else
                    answer = "error unsupported";
            }
            catch (Exception e) when (e is FormatException || e is IndexOutOfRangeException)
            {
                answer = "error " + e.Message.Replace('\n', ' ');
            }
            Console.Out.WriteLine(answer);
            Console.Out.Flush();
        }
        return 0;
    }
}
